"""Checkpoints with megatron-core's dist_checkpointing: written to a temporary folder, flushed to
disk (fsync), renamed into place, and only then recorded as the latest, so that a checkpoint
reported as saved exists. Resuming takes the newest checkpoint that loads: a damaged one (a
truncated file after a crash) is named and the next older one is tried."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megatron_hybridnorm.harness.dist_ckpt import use_in_process_write_queue
from megatron_hybridnorm.transformer.validate import SchemeMismatchError
from megatron_hybridnorm.models.detection import check_checkpoint


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
    _fsync_tree(tmp)  # every rank: its files are on disk before the checkpoint is published
    _barrier()
    if _main():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(folder)
        latest = folder / "latest"
        with open(folder / "latest.tmp", "w") as f:
            f.write(final.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(folder / "latest.tmp", latest)
        _fsync(folder)
    _barrier()
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


class CheckpointDamaged(RuntimeError):
    """No checkpoint of a run loads."""


def candidates(folder: Path) -> list[Path]:
    """The checkpoints to resume from, best first: the one marked latest, then the others by
    step, newest first."""
    steps = sorted((p for p in folder.glob("step_*") if p.is_dir()), reverse=True)
    first = latest(folder)
    return ([first] if first is not None else []) + [p for p in steps if p != first]


def load_newest_intact(folder: Path, model, optimizer, scheduler, note) -> int | None:
    """Load the newest checkpoint of ``folder`` that loads; ``note(text)`` names each damaged
    one. Returns its step, or None when there is none. A checkpoint of another norm scheme is
    an error, not damage."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException


    damaged = []
    for path in candidates(folder):
        try:
            step = load(path, model, optimizer, scheduler)
        except SchemeMismatchError:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any damage
            why = (str(e).strip().splitlines() or [""])[-1][:200]
            damaged.append(f"{path.name} ({type(e).__name__}: {why})")
            note(f"checkpoint {path} is damaged and is skipped ({type(e).__name__}: {why})")
            continue
        if damaged:
            note(f"resumed from {path.name}, the newest intact checkpoint")
        return step
    if damaged:
        raise CheckpointDamaged(f"no checkpoint in {folder} loads: {'; '.join(damaged)}; remove "
                                "them to start this run over")
    return None


def latest(folder: Path) -> Path | None:
    marker = folder / "latest"
    if not marker.is_file():
        return None
    path = folder / marker.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer and LR schedule; returns the step the checkpoint was saved at."""
    from megatron.core import dist_checkpointing


    check_checkpoint(model, path)
    state = dist_checkpointing.load(
        _state(model, optimizer, scheduler, 0, is_loading=True), str(path)
    )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
