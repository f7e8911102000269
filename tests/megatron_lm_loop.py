"""Megatron-LM's own training scripts, run through ``python -m megatron_hybridnorm.rehearse``
under torchrun, for the loop tests (test_megatron_lm_loop.py, test_megatron_lm_upgrades.py).

Megatron-LM's scripts are not in this repository. A tree per megatron-core release is looked for
in ``$MEGATRON_LM_TREES`` (default: ``megatron-lm/`` in the folder beside this clone, which CI's
machine provides), one folder per release: ``core_v0.16.1`` ... ``core_v0.19.0``, and ``main``
for a megatron-core newer than every tag there. ``$MEGATRON_LM`` (one tree, the user's own
checkout) overrides the lookup for the installed megatron-core.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = Path(os.environ.get("MEGATRON_LM_TREES", ROOT.parent / "shared" / "megatron-lm"))

# 4 layers, hidden 64, GQA, SwiGLU, RoPE, mock data: Megatron-LM's flags as a user passes them.
# Dropout 0, so that a resumed run repeats the uninterrupted one exactly (with dropout, the CPU
# DataLoader's seed comes from the generator dropout also draws from).
BASE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "128",
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "10",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--clip-grad", "1.0",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--init-method-std", "0.02",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
    "--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
    "--no-persist-layer-norm", "--log-interval", "1", "--eval-iters", "0",
    "--eval-interval", "1000", "--seed", "1234", "--ckpt-format", "torch_dist",
]
SPEC = "megatron_hybridnorm.entrypoints"
HYBRID_SPEC = "megatron_hybridnorm.hybrid.entrypoints"


def version_of(python: str = sys.executable) -> str:
    out = subprocess.run([python, "-c", "import warnings; warnings.filterwarnings('ignore'); "
                          "import megatron.core as m; print(m.__version__)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1].split("+")[0]


def _release(name: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"core_v(\d+)\.(\d+)\.(\d+)", name)
    return tuple(int(x) for x in m.groups()) if m else None


def tree_for(version: str) -> tuple[Path | None, str]:
    """(Megatron-LM tree for this megatron-core version, or None; why not)."""
    if os.environ.get("MEGATRON_LM"):
        return Path(os.environ["MEGATRON_LM"]), ""
    if not TREES.is_dir():
        return None, (f"no Megatron-LM trees at {TREES} (set MEGATRON_LM to a Megatron-LM "
                      "checkout, or MEGATRON_LM_TREES to a folder of them)")
    want = tuple(int(x) for x in version.split(".")[:2])
    tags = sorted((r, p) for p in TREES.iterdir() if (r := _release(p.name)))
    same = [p for r, p in tags if r[:2] == want]
    if same:
        return same[-1], ""
    if (TREES / "main").is_dir() and tags and want > tags[-1][0][:2]:
        return TREES / "main", ""
    return None, f"no Megatron-LM tree for megatron-core {version} in {TREES}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.eE+-]+|nan|inf)")


@dataclass
class Run:
    """One launch: its exit status, its output, and the losses it logged and recorded."""

    args: list[str]
    returncode: int
    log: str
    losses_file: Path
    logged: dict[int, float] = field(default_factory=dict)  # iteration -> logged lm loss

    def __post_init__(self):
        for it, loss in ITERATION.findall(self.log):
            self.logged[int(it)] = float(loss)

    @property
    def microbatches(self) -> dict[tuple[int, int, int], float]:
        """(iteration, data-parallel rank, microbatch) -> that microbatch's mean loss."""
        if not self.losses_file.is_file():
            return {}
        rows = [json.loads(line) for line in self.losses_file.read_text().splitlines()]
        return {(r["iteration"], r["dp_rank"], r["microbatch"]): r["loss"] for r in rows}

    def iteration_mean(self, it: int) -> float:
        values = [v for (i, _, _), v in self.microbatches.items() if i == it]
        return sum(values) / len(values)

    def tail(self, n: int = 6000) -> str:
        return self.log[-n:]

    def assert_trained(self, iterations: int = 10) -> None:
        """Every iteration logged, every microbatch's loss finite, the loss down."""
        assert self.returncode == 0, self.tail()
        assert sorted(self.logged) == list(range(1, iterations + 1)), self.tail()
        assert self.microbatches and all(math.isfinite(v) for v in self.microbatches.values())
        assert self.iteration_mean(iterations) < self.iteration_mean(1) - 0.05, (
            self.iteration_mean(1), self.iteration_mean(iterations))


def rehearse(out: Path, name: str, nproc: int, args: list[str], *,
             script: str = "pretrain_gpt.py", python: str = sys.executable,
             tree: Path | None = None, timeout: int = 600, env: dict | None = None) -> Run:
    """Run Megatron-LM's ``script`` with ``args`` on ``nproc`` CPU ranks through the runner."""
    out.mkdir(parents=True, exist_ok=True)
    losses = out / f"{name}.losses.jsonl"
    losses.unlink(missing_ok=True)
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "megatron_hybridnorm.rehearse", "--losses", str(losses)]
    if tree is not None:
        cmd += ["--megatron-lm", str(tree)]
    cmd += [script, *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDNORM_")}
    environ.update(PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    (out / f"{name}.log").write_text(" ".join(cmd) + "\n" + log)
    return Run(args, proc.returncode, log, losses)


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (nothing: {})."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
