"""The figures: loss.png (smoothed train loss; validation loss minus the baseline's, with seed
bands), grad_flow.png (per-layer gradient norms) and, for a sweep, lr_sweep.png.

Each plotting function returns what it drew, per panel (title, legend labels, which schemes have
a seed band), so that tests can check the figures without reading pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_hybridnorm.train.log import num


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(plt, schemes):
    return dict(zip(schemes, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(rows, scheme, seed, lr, field):
    return {r["step"]: num(r[field]) for r in rows
            if (r["scheme"], r["seed"], r["peak_lr"]) == (scheme, seed, lr)
            and r[field] is not None and math.isfinite(num(r[field]))}


def _panel(ax, bands: list[str]) -> dict:
    legend = ax.get_legend()
    return dict(title=ax.get_title(),
                labels=[t.get_text() for t in legend.get_texts()] if legend else [], bands=bands)


def plot_loss(folder: Path, summary: dict, rows: list[dict]) -> list[dict]:
    """One row of two panels per peak learning rate."""
    plt = _plt()
    schemes, seeds, lrs, base = (summary[k] for k in ("schemes", "seeds", "peak_lrs", "baseline"))
    colors = _colors(plt, schemes)
    n = len(seeds)
    fig, axes = plt.subplots(len(lrs), 2, figsize=(13, 4.6 * len(lrs)), squeeze=False)
    panels = []
    for (ax_t, ax_v), lr in zip(axes, lrs):
        at = f" (peak lr {lr:g})" if len(lrs) > 1 else ""
        # smoothed train loss, mean over seeds; the y axis skips the first tenth of training
        tops, bottoms = [], []
        for s in schemes:
            per_seed = [_series(rows, s, seed, lr, "train_loss") for seed in seeds]
            steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
            steps = [t for t in steps if t > 0]
            if not steps:
                continue
            window = max(1, len(steps) // 20)
            curves = [smooth([p[t] for t in steps], window) for p in per_seed]
            mean = [sum(c[i] for c in curves) / n for i in range(len(steps))]
            ax_t.plot(steps, mean, color=colors[s], lw=1.6, label=s)
            tail = mean[len(mean) // 10:]
            tops.append(max(tail))
            bottoms.append(min(tail))
        if tops:
            pad = 0.05 * (max(tops) - min(bottoms) or 1.0)
            ax_t.set_ylim(min(bottoms) - pad, max(tops) + pad)
        ax_t.set_title(f"train loss, moving average{', mean of %d seeds' % n if n > 1 else ''}{at}")
        ax_t.set_xlabel("step")
        ax_t.set_ylabel("loss (nats/token)")
        ax_t.grid(alpha=0.3)
        ax_t.legend()
        panels.append(_panel(ax_t, []))

        # validation loss minus the baseline's, paired by seed: mean and the range over seeds
        bands = []
        ax_v.axhline(0.0, color=colors.get(base, "k"), lw=1.2, ls="--", label=f"{base} (baseline)")
        base_vals = {seed: _series(rows, base, seed, lr, "val_loss") for seed in seeds}
        for s in schemes:
            if s == base:
                continue
            diffs = {}
            for seed in seeds:
                mine = _series(rows, s, seed, lr, "val_loss")
                for t in mine.keys() & base_vals[seed].keys():
                    diffs.setdefault(t, []).append(mine[t] - base_vals[seed][t])
            steps = [t for t in sorted(diffs) if t > 0 and len(diffs[t]) == n]
            if not steps:
                continue
            mean = [sum(diffs[t]) / n for t in steps]
            ax_v.plot(steps, mean, color=colors[s], marker="o", ms=3, lw=1.6, label=s)
            if n > 1:
                ax_v.fill_between(steps, [min(diffs[t]) for t in steps],
                                  [max(diffs[t]) for t in steps], color=colors[s], alpha=0.2,
                                  lw=0)
                bands.append(s)
        band = f", band: range over {n} seeds" if n > 1 else ""
        ax_v.set_title(f"validation loss minus {base}'s{band}{at}")
        ax_v.set_xlabel("step")
        ax_v.set_ylabel("difference (nats/token; below 0 is better)")
        ax_v.grid(alpha=0.3)
        ax_v.legend()
        panels.append(_panel(ax_v, bands))
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)
    return panels


def plot_grad_flow(folder: Path, summary: dict, flows: list[dict]) -> list[dict]:
    """Per-layer gradient norms at the chosen steps: the geometric mean over seeds, at the first
    peak learning rate."""
    plt = _plt()
    schemes, seeds, lr = summary["schemes"], summary["seeds"], summary["peak_lrs"][0]
    colors = _colors(plt, schemes)
    steps = sorted({r["step"] for r in flows})
    if not steps:
        return []
    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 4), squeeze=False)
    for ax, step in zip(axes[0], steps):
        for s in schemes:
            mine = [[num(v) for v in r["layer_grad_norms"]] for r in flows
                    if r["step"] == step and r["scheme"] == s and r["peak_lr"] == lr]
            if not mine:
                continue
            geo = [math.exp(sum(math.log(max(v[i], 1e-30)) for v in mine) / len(mine))
                   for i in range(len(mine[0]))]
            ax.plot(range(len(geo)), geo, marker="o", color=colors[s], label=s)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("gradient norm")
        over = f", geometric mean of {len(seeds)} seeds" if len(seeds) > 1 else ""
        ax.set_title(f"per-layer gradient norm at step {step}{over}"
                     + (f"\n(peak lr {lr:g})" if len(summary["peak_lrs"]) > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    panels = [_panel(ax, []) for ax in axes[0]]
    fig.tight_layout()
    fig.savefig(folder / "grad_flow.png", dpi=110)
    plt.close(fig)
    return panels


def plot_sweep(folder: Path, summary: dict) -> list[dict]:
    """Final validation loss against the peak learning rate; a cross marks divergence."""
    plt = _plt()
    colors = _colors(plt, summary["schemes"])
    lrs = summary["peak_lrs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [c["final_val_loss"] for by_lr in summary["lr_sweep"].values()
              for c in by_lr.values() if c["final_val_loss"] is not None]
    top = max(finite) + 0.1 * (max(finite) - min(finite) or 1.0) if finite else 1.0
    for s, by_lr in summary["lr_sweep"].items():
        ok = [(lr, by_lr[f"{lr:g}"]["final_val_loss"]) for lr in lrs
              if by_lr[f"{lr:g}"]["final_val_loss"] is not None]
        if ok:
            ax.plot(*zip(*ok), marker="o", color=colors[s], label=s)
        div = [lr for lr in lrs if by_lr[f"{lr:g}"]["diverged_steps"]]
        if div:
            ax.scatter(div, [top] * len(div), marker="x", s=70, color=colors[s],
                       label=f"{s} diverged")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats/token)")
    n = len(summary["seeds"])
    ax.set_title("learning-rate sweep" + (f", mean of {n} seeds" if n > 1 else "")
                 + "; x: diverged")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    panels = [_panel(ax, [])]
    fig.tight_layout()
    fig.savefig(folder / "lr_sweep.png", dpi=110)
    plt.close(fig)
    return panels


def plot(folder: Path, summary: dict, rows: list[dict], flows: list[dict]) -> dict:
    """Every figure of a run; returns {file name: panels}."""
    out = {"loss.png": plot_loss(folder, summary, rows)}
    g = plot_grad_flow(folder, summary, flows)
    if g:
        out["grad_flow.png"] = g
    if summary["lr_sweep"]:
        out["lr_sweep.png"] = plot_sweep(folder, summary)
    return out
