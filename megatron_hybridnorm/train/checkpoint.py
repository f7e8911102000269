"""Checkpoints with megatron-core's dist_checkpointing: written to a temporary folder, renamed
into place, and only then recorded as the latest, so that a checkpoint reported as saved exists."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..dist_ckpt import use_in_process_write_queue


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _state(model, optimizer, scheduler, step: int, is_loading: bool = False) -> dict:
    state = {"model": model.sharded_state_dict(), "step": step}
    state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading)
    state["scheduler"] = scheduler.state_dict()
    return state


def save(folder: Path, model, optimizer, scheduler, step: int) -> Path:
    """Save after ``step`` optimizer steps into ``folder/step_<step>``; returns that path."""
    from megatron.core import dist_checkpointing

    use_in_process_write_queue()
    final = folder / f"step_{step:06d}"
    tmp = folder / f".step_{step:06d}.tmp"
    if _main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_state(model, optimizer, scheduler, step), str(tmp))
    _barrier()
    if _main():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest = folder / "latest"
        (folder / "latest.tmp").write_text(final.name)
        os.replace(folder / "latest.tmp", latest)
    _barrier()
    return final


def latest(folder: Path) -> Path | None:
    marker = folder / "latest"
    if not marker.is_file():
        return None
    path = folder / marker.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer and LR schedule; returns the step the checkpoint was saved at."""
    from megatron.core import dist_checkpointing

    from ..inspect import check_checkpoint

    check_checkpoint(model, path)
    state = dist_checkpointing.load(
        _state(model, optimizer, scheduler, 0, is_loading=True), str(path)
    )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
