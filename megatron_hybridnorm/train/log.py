"""What a run writes as it goes: metrics.jsonl and grad_flow.jsonl, one row per step and run."""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_hybridnorm.harness.dist import is_main


def _clean(value):
    """JSON has no NaN or infinity: write them as strings, as Python's json would misspell them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def num(v):
    """A logged number (NaN and infinity are logged as strings) as a float, or None."""
    return float(v) if v is not None else None


class RunLog:
    """Appends rows on rank 0; each row names its run (scheme, seed, peak_lr). ``note`` prints
    above the progress bar."""

    def __init__(self, folder: Path, printer=print):
        self.folder = folder
        self.metrics_path = folder / "metrics.jsonl"
        self.grad_flow_path = folder / "grad_flow.jsonl"
        self.printer = printer

    def _append(self, path: Path, row: dict) -> None:
        if is_main():
            with path.open("a") as f:
                f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def metrics(self, key, step: int, *, train_loss=None, val_loss=None, grad_norm=None,
                tokens_per_s=None, lr=None) -> None:
        self._append(self.metrics_path, dict(
            **key.fields(), step=step, train_loss=train_loss, val_loss=val_loss,
            grad_norm=grad_norm, tokens_per_s=tokens_per_s, lr=lr))

    def grad_flow(self, key, step: int, norms: list[float]) -> None:
        self._append(self.grad_flow_path, dict(**key.fields(), step=step, layer_grad_norms=norms))

    def note(self, text: str) -> None:
        if is_main():
            self.printer(text)

    def truncate(self, key, after_step: int) -> None:
        """Drop a run's rows past ``after_step`` (written after its last checkpoint)."""
        if not is_main():
            return
        for path in (self.metrics_path, self.grad_flow_path):
            rows = [r for r in read_jsonl(path) if not (key.matches(r) and r["step"] > after_step)]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
