"""Megatron-LM's pretrain_gpt.py on the CPU, through ``python -m megatron_hybridnorm.rehearse``:
our ``prenorm`` against megatron-core's own local spec (no ``--spec``) at the same config, and
``hybridnorm`` and ``hybridnorm_star`` against our ``prenorm``.

    python benchmarks/bench_megatron_lm.py --megatron-lm DIR [--out FOLDER] [--iters 30] [--rounds 5]

Each configuration trains ``--iters`` iterations, ``--rounds`` times in turn (stock, prenorm,
..., hybridnorm_star, then again), one process at a time. Each launch's figure is the median of
Megatron-LM's logged per-iteration time after ``--warmup`` iterations; a ratio is taken within
each round (the machine drifts between rounds) and the median of those is reported. A CPU timing: it says what this package's
modules cost next to megatron-core's own on the same machine, nothing about a GPU.
Writes ``megatron_lm_cpu.json`` and ``megatron_lm_cpu.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = [
    "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "1024",
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--seq-length", "256", "--max-position-embeddings", "256",
    "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "1e-3",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--mock-data",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--transformer-impl", "local",
    "--no-rope-fusion", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100000", "--seed", "1234",
]
CONFIGS = {
    "stock": [],  # megatron-core's get_gpt_layer_local_spec, Megatron-LM's default
    "prenorm": ["--spec", "megatron_hybridnorm.entrypoints", "prenorm"],
    # to attribute prenorm / stock: ours with megatron-core's core attention instead of SDPA
    "prenorm_megatron_attention": ["--spec", "megatron_lm_variants", "prenorm_megatron_attention"],
    "hybridnorm": ["--spec", "megatron_hybridnorm.entrypoints", "hybridnorm"],
    "hybridnorm_star": ["--spec", "megatron_hybridnorm.entrypoints", "hybridnorm_star"],
}
RATIOS = [("prenorm", "stock"), ("prenorm_megatron_attention", "stock"),
          ("hybridnorm", "prenorm"), ("hybridnorm_star", "prenorm")]
ELAPSED = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def launch(tree: str, args: list[str], log: Path) -> list[tuple[int, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m",
           "megatron_hybridnorm.rehearse", "--megatron-lm", tree, "pretrain_gpt.py", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDNORM_")}
    path = os.pathsep.join(p for p in (str(ROOT / "benchmarks"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(env, PYTHONWARNINGS="ignore", PYTHONPATH=path),
                          capture_output=True, text=True)
    log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[-3:])}: exit {proc.returncode}, see {log}")
    return [(int(i), float(ms)) for i, ms in ELAPSED.findall(proc.stdout + proc.stderr)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"),
                    help="a Megatron-LM tree of the installed megatron-core's tag (or $MEGATRON_LM)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "megatron_lm_cpu")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if not args.megatron_lm:
        ap.error("pass --megatron-lm DIR (or set MEGATRON_LM): a Megatron-LM checkout")
    import megatron.core
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench_megatron_lm_"))
    times, rounds = {name: [] for name in CONFIGS}, {}
    start = time.monotonic()
    for r in range(args.rounds):
        for name, extra in CONFIGS.items():
            found = launch(args.megatron_lm, [*MODEL, "--train-iters", str(args.iters), *extra],
                           logs / f"{name}-{r}.log")
            # past warm-up; Megatron-LM's second logged line averages two iterations
            times[name] += [ms for i, ms in found if i > max(args.warmup, 2)]
            mine = [ms for i, ms in found if i > max(args.warmup, 2)]
            rounds.setdefault(name, []).append(round(statistics.median(mine), 2))
            print(f"round {r + 1}, {name}: median {rounds[name][-1]:.1f} ms", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = dict(
        date=time.strftime("%Y-%m-%d"), machine=f"{cpu_name()}, {os.cpu_count()} cores "
        f"({platform.machine()})", gpu=torch.cuda.is_available(),
        python=platform.python_version(), torch=torch.__version__.split("+")[0],
        megatron_core=megatron.core.__version__.split("+")[0],
        megatron_lm=Path(args.megatron_lm).resolve().name,  # the tree's folder: its tag
        command=" ".join(["python", *("<Megatron-LM tree>" if a == args.megatron_lm else a
                                      for a in sys.argv)]),
        model=MODEL, iters=args.iters, warmup=args.warmup, rounds=args.rounds,
        samples={k: len(v) for k, v in times.items()},
        median_ms={k: round(v, 2) for k, v in medians.items()}, round_medians_ms=rounds,
        # each round's ratio (the two measured minutes apart, not the machine's drift between
        # rounds), then their median
        round_ratios={f"{a} / {b}": [round(x / y, 3) for x, y in zip(rounds[a], rounds[b])]
                      for a, b in RATIOS},
        ratios={f"{a} / {b}": round(statistics.median(x / y for x, y in zip(rounds[a], rounds[b])),
                                    3) for a, b in RATIOS},
        wall_s=round(time.monotonic() - start, 1))
    (args.out / "megatron_lm_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Megatron-LM pretrain_gpt.py on the CPU ({result['machine']}; torch "
             f"{result['torch']}, megatron-core {result['megatron_core']}; {result['date']}): "
             f"median iteration time of {args.iters} iterations after {args.warmup} of warm-up, "
             f"one process, in {args.rounds} rounds; the ratio is the median of the rounds' "
             "ratios.", "",
             "| configuration | each round's median ms | ratio | each round's ratio |",
             "|---|---|---|---|"]
    base = dict(RATIOS)
    for name in CONFIGS:
        each = " / ".join(f"{m:.1f}" for m in rounds[name])
        key = f"{name} / {base.get(name)}"
        ratio = f"{result['ratios'][key]:.3f} x {base[name]}" if name in base else "(baseline)"
        per = " / ".join(f"{r:.3f}" for r in result["round_ratios"][key]) if name in base else ""
        lines.append(f"| {name} | {each} | {ratio} | {per} |")
    (args.out / "megatron_lm_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
