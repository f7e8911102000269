"""summary.json and the printed tables: each run's losses, the seed statistics of each scheme,
its paired difference from the baseline scheme, which orderings the seeds support, and the
learning-rate sweep."""

from __future__ import annotations

import math
from itertools import combinations

from megatron_hybridnorm.train.log import num
from megatron_hybridnorm.train.runs import RunKey
from megatron_hybridnorm.train.stats import SEEDS_LIMIT, paired_interval, seeds_needed, spread

# the paper's claim, best first (arXiv 2503.04598: 1.2B dense at 1T tokens, val loss
# 2.796 / 2.805 / 2.816)
PAPER_ORDER = ("hybridnorm_star", "hybridnorm", "prenorm")
METRICS = ("final_val_loss", "best_val_loss")


def run_record(rows: list[dict], key: RunKey, diverged_step: int | None) -> dict:
    """One run: its initial, final and best validation loss, divergence, mean tokens/s."""
    mine = [r for r in rows if key.matches(r)]
    vals = [(r["step"], num(r["val_loss"])) for r in mine if r["val_loss"] is not None]
    finite = [v for _, v in vals if math.isfinite(v)]
    speeds = [num(r["tokens_per_s"]) for r in mine if r["tokens_per_s"] is not None][1:]
    diverged = diverged_step is not None
    return dict(
        **key.fields(),
        steps=max((r["step"] for r in mine), default=0),
        initial_val_loss=vals[0][1] if vals else None,
        # a diverged run has no final loss: its last evaluation came before it diverged
        final_val_loss=vals[-1][1] if vals and not diverged else None,
        best_val_loss=min(finite) if finite else None,
        diverged=diverged,
        diverged_step=diverged_step,
        tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
    )


def _paired(records: dict, a: str, b: str, seeds: list[int], metric: str):
    pairs = [(records[a, s][metric], records[b, s][metric]) for s in seeds
             if records[a, s][metric] is not None and records[b, s][metric] is not None]
    return paired_interval([x for x, _ in pairs], [y for _, y in pairs])


def compare(records: dict, schemes: list[str], seeds: list[int], baseline: str, lr: float) -> dict:
    """The schemes at one peak learning rate, over seeds. ``records[(scheme, seed)]``."""
    out = {}
    for s in schemes:
        mine = [records[s, seed] for seed in seeds]
        speeds = [r["tokens_per_s"] for r in mine if r["tokens_per_s"] is not None]
        row = {m: spread([r[m] for r in mine if r[m] is not None]).as_dict() for m in METRICS}
        row["diverged"] = sum(r["diverged"] for r in mine)
        row["tokens_per_s"] = sum(speeds) / len(speeds) if speeds else None
        if s != baseline:
            row["minus_baseline"] = {m: _interval(_paired(records, s, baseline, seeds, m))
                                     for m in METRICS}
        out[s] = row
    return dict(peak_lr=lr, runs=len(seeds), schemes=out,
                orderings=orderings(records, schemes, seeds))


def _interval(iv) -> dict:
    return dict(iv.as_dict(), excludes_zero=iv.excludes_zero,
                seeds_needed=seeds_needed(iv.mean, iv.std))


def _needed(d: dict) -> str:
    """What more seeds would do for an open pair (its ``_interval``), in words."""
    n = d["seeds_needed"]
    if n is None:
        return (f"at this gap and spread even {SEEDS_LIMIT} seeds would not resolve it"
                if d["mean"] else "no gap at all")
    return f"at this gap and spread a 95% interval would exclude 0 from {n} seeds"


def orderings(records: dict, schemes: list[str], seeds: list[int]) -> dict:
    """Which orderings of final validation loss the seeds support (the 95% interval of the
    paired difference excludes zero) and which they leave open, in words."""
    supported, open_, pairs = [], [], []
    lower: set[tuple[str, str]] = set()  # (a, b): a is supported lower than b
    for a, b in combinations(schemes, 2):
        iv = _paired(records, a, b, seeds, "final_val_loss")
        d = _interval(iv)
        pairs.append(dict(a=a, b=b, a_minus_b=d))
        if iv.n < 2:
            open_.append(f"{a} vs {b}: {iv.n} seed(s) with both runs finished; an interval "
                         "needs at least 2 (run --seeds 3 or more)")
            continue
        if iv.excludes_zero:
            if iv.mean < 0:
                lo, hi, mean, low, high = a, b, iv.mean, iv.low, iv.high
            else:
                lo, hi, mean, low, high = b, a, -iv.mean, -iv.high, -iv.low
            lower.add((lo, hi))
            supported.append(f"{lo} < {hi}: {lo} - {hi} = {mean:+.4f} (95% interval "
                             f"{low:+.4f} to {high:+.4f}, {iv.n} seeds)")
        else:
            open_.append(f"{a} vs {b}: not resolved, {a} - {b} = {iv.mean:+.4f} (95% interval "
                         f"{iv.low:+.4f} to {iv.high:+.4f} includes 0, {iv.n} seeds); "
                         + _needed(d))
    return dict(supported=supported, not_supported=open_, paper=_paper_verdict(schemes, lower),
                pairs=pairs)


def _paper_verdict(schemes: list[str], lower: set) -> str | None:
    present = [s for s in PAPER_ORDER if s in schemes]
    if len(present) < 2:
        return None
    claim = " < ".join(present)
    pairs = list(combinations(present, 2))  # (better, worse) by the paper
    against = [f"{b} < {a}" for a, b in pairs if (b, a) in lower]
    held = [p for p in pairs if p in lower]
    if against:
        return f"the paper's ordering {claim} is contradicted: " + "; ".join(against)
    if len(held) == len(pairs):
        return f"the paper's ordering {claim} is supported, every pair"
    missing = [f"{a} < {b}" for a, b in pairs if (a, b) not in lower]
    return (f"the paper's ordering {claim} is not contradicted, but not resolved for: "
            + "; ".join(missing))


def sweep(records: dict, schemes: list[str], seeds: list[int], lrs: list[float]) -> dict:
    """Per scheme and peak learning rate: mean final loss over seeds that finished, and the
    steps at which the others diverged."""
    out = {}
    for s in schemes:
        out[s] = {}
        for lr in lrs:
            mine = [records[s, seed, lr] for seed in seeds]
            finals = [r["final_val_loss"] for r in mine if r["final_val_loss"] is not None]
            out[s][f"{lr:g}"] = dict(
                final_val_loss=spread(finals).mean,
                diverged_steps=[r["diverged_step"] for r in mine if r["diverged"]], runs=len(mine))
    return out


def summarize(rows: list[dict], keys: list[RunKey], diverged: dict, baseline: str) -> dict:
    """summary.json. ``diverged[key]`` is a run's divergence step or None."""
    schemes = list(dict.fromkeys(k.scheme for k in keys))
    seeds = sorted({k.seed for k in keys})
    lrs = sorted({k.lr for k in keys})
    records = {(k.scheme, k.seed, k.lr): run_record(rows, k, diverged.get(k)) for k in keys}
    return from_runs(list(records.values()), schemes, seeds, lrs, baseline)


def from_runs(runs: list[dict], schemes: list[str], seeds: list[int], lrs: list[float],
              baseline: str) -> dict:
    """The statistics of summary.json from its per-run records alone."""
    records = {(r["scheme"], r["seed"], r["peak_lr"]): r for r in runs}
    comparisons = [compare({(s, seed): records[s, seed, lr] for s in schemes for seed in seeds},
                           schemes, seeds, baseline, lr) for lr in lrs]
    return dict(
        schemes=schemes, seeds=seeds, peak_lrs=lrs, baseline=baseline, runs=runs,
        comparisons=comparisons,
        lr_sweep=sweep(records, schemes, seeds, lrs) if len(lrs) > 1 else None,
    )


def refresh(summary: dict) -> dict:
    """A saved summary.json with its statistics computed again by this version's code (from its
    per-run records; their losses are kept as they were measured, and so are its other fields)."""
    new = from_runs(summary["runs"], summary["schemes"], summary["seeds"], summary["peak_lrs"],
                    summary["baseline"])
    return {**summary, **new}


PHASES = {"step": "training steps", "eval": "evaluation", "data": "data loading",
          "build": "model build", "save": "checkpoints", "sample": "samples"}


def time_shares(outcomes) -> dict | None:
    """Seconds and share of the runs' wall time per phase, over the runs that recorded them."""
    timed = [o for o in outcomes if "phase_s" in o]
    wall = sum(o["wall_s"] for o in timed)
    if not timed or wall <= 0:
        return None
    seconds = {p: sum(o["phase_s"].get(p, 0.0) for o in timed) for p in PHASES}
    seconds["other"] = max(0.0, wall - sum(seconds.values()))
    return dict(wall_s=wall, runs=len(timed), seconds=seconds,
                share={p: v / wall for p, v in seconds.items()})


def time_line(shares: dict) -> str:
    parts = [f"{PHASES.get(p, p)} {v:.1%}" for p, v in
             sorted(shares["share"].items(), key=lambda kv: -kv[1]) if v >= 0.0005]
    return (f"where the time went ({shares['runs']} runs, {shares['wall_s'] / 60:.1f} min): "
            + ", ".join(parts))


def _f(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _mean_std(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    return _f(s["mean"]) + (f" ± {s['std']:.4f}" if s["std"] is not None else "")


def table(summary: dict) -> str:
    """The comparison at each peak learning rate, the orderings in words, and the sweep."""
    n, base = len(summary["seeds"]), summary["baseline"]
    w = max([16, *(len(s) + 1 for s in summary["schemes"])])
    out = []
    for c in summary["comparisons"]:
        if len(summary["peak_lrs"]) > 1:
            out.append(f"peak learning rate {c['peak_lr']:g}:")
        spread_ = " (mean ± std)" if n > 1 else ""
        out.append(f"validation loss, {n} seed{'s' if n > 1 else ''}{spread_}; "
                   f"difference from {base} paired by seed"
                   + (" (95% interval)" if n > 1 else ""))
        head = (f"{'scheme':<{w}} {'final val':>17} {'best val':>17} "
                f"{'final - ' + base:>30} {'diverged':>9} {'tokens/s':>9}")
        out += [head, "-" * len(head)]
        for s, r in c["schemes"].items():
            d = r.get("minus_baseline", {}).get("final_val_loss")
            if d is None:
                diff = "(baseline)"
            elif d["mean"] is None:
                diff = "-"
            elif d["low"] is None:
                diff = f"{d['mean']:+.4f}"
            else:
                diff = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
            tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
            out.append(f"{s:<{w}} {_mean_std(r['final_val_loss']):>17} "
                       f"{_mean_std(r['best_val_loss']):>17} {diff:>30} "
                       f"{r['diverged']:>4}/{n:<4} {tps:>9}")
        o = c["orderings"]
        if n > 1:
            for line in o["supported"]:
                out.append(f"  supported:     {line}")
            for line in o["not_supported"]:
                out.append(f"  not supported: {line}")
            if o["paper"]:
                out.append(f"  {o['paper']}")
        out.append("")
    if summary["lr_sweep"]:
        out.append(sweep_table(summary))
    if summary.get("time_shares"):
        out.append(time_line(summary["time_shares"]))
    return "\n".join(out).rstrip()


def sweep_table(summary: dict) -> str:
    lrs = [f"{lr:g}" for lr in summary["peak_lrs"]]
    w = max([16, *(len(s) + 1 for s in summary["schemes"])])
    head = f"{'peak lr':<{w}}" + "".join(f"{lr:>16}" for lr in lrs)
    lines = ["final validation loss by peak learning rate (div @ N: diverged at step N)",
             head, "-" * len(head)]
    for s, by_lr in summary["lr_sweep"].items():
        cells = []
        for lr in lrs:
            c = by_lr[lr]
            if c["diverged_steps"] and c["final_val_loss"] is None:
                cell = "div @ " + ",".join(map(str, c["diverged_steps"]))
            elif c["diverged_steps"]:
                cell = f"{_f(c['final_val_loss'])} ({len(c['diverged_steps'])} div)"
            else:
                cell = _f(c["final_val_loss"])
            cells.append(f"{cell:>16}")
        lines.append(f"{s:<{w}}" + "".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m megatron_hybridnorm.train.summary FOLDER``: recompute a run folder's
    summary.json statistics with this version (after a statistic is added) and print its table."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m megatron_hybridnorm.train.summary",
                                description=main.__doc__.split(":", 1)[1].strip())
    p.add_argument("folder", help="a run folder holding summary.json")
    path = Path(p.parse_args(argv).folder) / "summary.json"
    if not path.is_file():
        p.exit(2, f"{p.prog}: error: {path} does not exist\n")
    summary = refresh(json.loads(path.read_text()))
    path.write_text(json.dumps(summary, indent=2))
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
