"""What a run writes: metrics.jsonl, grad_flow.jsonl, summary.json, the plots and the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .dist import is_main


def _clean(value):
    """JSON has no NaN or infinity: write them as strings, as Python's json would misspell them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """Appends rows on rank 0; ``note`` prints above the progress bar."""

    def __init__(self, folder: Path, printer=print):
        self.folder = folder
        self.metrics_path = folder / "metrics.jsonl"
        self.grad_flow_path = folder / "grad_flow.jsonl"
        self.printer = printer

    def _append(self, path: Path, row: dict) -> None:
        if is_main():
            with path.open("a") as f:
                f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def metrics(self, scheme: str, step: int, *, train_loss=None, val_loss=None, grad_norm=None,
                tokens_per_s=None, lr=None) -> None:
        self._append(self.metrics_path, dict(
            scheme=scheme, step=step, train_loss=train_loss, val_loss=val_loss,
            grad_norm=grad_norm, tokens_per_s=tokens_per_s, lr=lr))

    def grad_flow(self, scheme: str, step: int, norms: list[float]) -> None:
        self._append(self.grad_flow_path, dict(scheme=scheme, step=step, layer_grad_norms=norms))

    def note(self, text: str) -> None:
        if is_main():
            self.printer(text)

    def truncate(self, scheme: str, after_step: int) -> None:
        """Drop a scheme's rows past ``after_step`` (written after its last checkpoint)."""
        if not is_main():
            return
        for path in (self.metrics_path, self.grad_flow_path):
            rows = [r for r in _read_jsonl(path)
                    if not (r["scheme"] == scheme and r["step"] > after_step)]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _num(v):
    return float(v) if v is not None else None


def summarize(folder: Path, schemes: list[str], outcomes: dict) -> dict:
    """Per scheme: initial, final and best val loss, divergence, and mean tokens/s."""
    rows = _read_jsonl(folder / "metrics.jsonl")
    summary = {}
    for s in schemes:
        mine = [r for r in rows if r["scheme"] == s]
        vals = [(r["step"], _num(r["val_loss"])) for r in mine if r["val_loss"] is not None]
        finite = [v for _, v in vals if math.isfinite(v)]
        speeds = [_num(r["tokens_per_s"]) for r in mine if r["tokens_per_s"] is not None][1:]
        out = outcomes.get(s)
        summary[s] = dict(
            steps=max((r["step"] for r in mine), default=0),
            initial_val_loss=vals[0][1] if vals else None,
            final_val_loss=vals[-1][1] if vals else None,
            best_val_loss=min(finite) if finite else None,
            diverged=out is not None and out.diverged_step is not None,
            diverged_step=out.diverged_step if out is not None else None,
            tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
        )
    return summary


def table(summary: dict) -> str:
    w = max([16, *(len(s) + 1 for s in summary)])
    head = f"{'scheme':<{w}} {'final val':>10} {'best val':>10} {'diverged':>10} {'tokens/s':>10}"
    lines = [head, "-" * len(head)]
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    for s, r in summary.items():
        div = f"step {r['diverged_step']}" if r["diverged"] else "no"
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        lines.append(f"{s:<{w}} {fmt(r['final_val_loss']):>10} {fmt(r['best_val_loss']):>10} "
                     f"{div:>10} {tps:>10}")
    return "\n".join(lines)


def plot(folder: Path, schemes: list[str]) -> dict[str, list[list[str]]]:
    """loss.png (train and val of every scheme) and grad_flow.png (per-layer gradient norms).

    Returns each file's legend labels, one list per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_jsonl(folder / "metrics.jsonl")
    colors = dict(zip(schemes, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in schemes:
        mine = [r for r in rows if r["scheme"] == s]
        train = [(r["step"], _num(r["train_loss"])) for r in mine if r["train_loss"] is not None]
        val = [(r["step"], _num(r["val_loss"])) for r in mine if r["val_loss"] is not None]
        if train:
            ax.plot(*zip(*train), color=colors[s], alpha=0.35, lw=1)
        if val:
            ax.plot(*zip(*val), color=colors[s], marker="o", ms=3, lw=1.8, label=s)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("train (faint) and validation (markers) loss")
    ax.legend()
    ax.grid(alpha=0.3)
    labels = {"loss.png": [_legend(ax)]}
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)

    flows = _read_jsonl(folder / "grad_flow.jsonl")
    steps = sorted({r["step"] for r in flows})
    if not steps:
        return labels
    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 4), squeeze=False)
    for ax, step in zip(axes[0], steps):
        for r in flows:
            if r["step"] == step and r["scheme"] in colors:
                norms = [_num(v) for v in r["layer_grad_norms"]]
                ax.plot(range(len(norms)), norms, marker="o", color=colors[r["scheme"]],
                        label=r["scheme"])
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("gradient norm")
        ax.set_title(f"per-layer gradient norm at step {step}")
        ax.grid(alpha=0.3)
        ax.legend()
    labels["grad_flow.png"] = [_legend(ax) for ax in axes[0]]
    fig.tight_layout()
    fig.savefig(folder / "grad_flow.png", dpi=110)
    plt.close(fig)
    return labels


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]
