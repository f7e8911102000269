"""Rerun every committed study (docs/study/*/config.json) for a few steps and write its losses;
or compare two such files. A refactor that keeps behaviour gives the same losses, bit for bit,
on the same machine:

    .venv/bin/python scripts/study_reruns.py --out before.json      # on the old commit
    .venv/bin/python scripts/study_reruns.py --out after.json       # on the new one
    .venv/bin/python scripts/study_reruns.py --compare before.json after.json

Each study runs with its saved flags except --steps (default 12), --seeds 1, --eval-interval
(half the steps), --grad-flow-steps 1 and --warmup (at most a quarter of the steps); its
preset is dropped, since the saved flags already hold what it set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def argv_of(saved: dict, steps: int) -> list[str]:
    from megatron_hybridnorm.train.cli import parser

    args = {**saved, "preset": None, "steps": steps, "seeds": 1,
            "eval_interval": max(1, steps // 2), "grad_flow_steps": "1", "resume": False,
            "name": None, "runs_dir": None, "save_interval": None}
    args["warmup"] = min(args.get("warmup") or 0, steps // 4)
    if args.get("lr_sweep"):
        args["lr"] = None
    out = []
    for action in parser()._actions:
        value = args.get(action.dest)
        if not action.option_strings or value is None or value is False:
            continue
        flag = action.option_strings[-1]
        if value is True:
            out.append(flag)
        else:
            value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            out += [flag, value]
    return out


def losses(folder: Path) -> dict:
    """{run: [[step, train_loss, val_loss], ...]} from the run's metrics.jsonl."""
    runs: dict = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = f"{row['scheme']} seed={row.get('seed')} lr={row.get('peak_lr')}"
        runs.setdefault(key, []).append([row["step"], row["train_loss"], row["val_loss"]])
    return runs


def rerun(steps: int) -> dict:
    found = {}
    for config in sorted(ROOT.glob("docs/study/*/config.json")):
        study = config.parent.name
        argv = argv_of(json.loads(config.read_text())["args"], steps)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "megatron_hybridnorm.train", *argv, "--runs-dir", tmp,
                   "--name", study]
            print(" ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            found[study] = losses(Path(tmp) / study)
    return found


def compare(a: Path, b: Path) -> int:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    diff = [f"{s}: {k}" for s in sorted(set(x) | set(y))
            for k in sorted(set(x.get(s, {})) | set(y.get(s, {})))
            if x.get(s, {}).get(k) != y.get(s, {}).get(k)]
    runs = sum(len(v) for v in x.values())
    print(f"{len(x)} studies, {runs} runs: " + ("the same losses, bit for bit" if not diff
                                                 else f"{len(diff)} differ: " + "; ".join(diff)))
    return 1 if diff or set(x) != set(y) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("pass --out FILE or --compare A B")
    args.out.write_text(json.dumps(rerun(args.steps), indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
