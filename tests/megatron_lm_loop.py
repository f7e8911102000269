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
# 255 tokens and the NullTokenizer's end-of-document make 256, padded to 256 at TP=1 and 2 alike:
# where the padded vocabulary differs between layouts, megatron-core 0.16 and 0.17 reshard the
# embedding misaligned without a word (0.18 and later load it right). Dropout 0, so that a resumed run repeats the uninterrupted one exactly (with dropout, the CPU
# DataLoader's seed comes from the generator dropout also draws from).
BASE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "128",
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "10",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--clip-grad", "1.0",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--init-method-std", "0.02",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
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


def _command(out: Path, name: str, nproc: int, args: list[str], script: str, python: str,
             tree: Path | None) -> tuple[list[str], Path]:
    losses = out / f"{name}.losses.jsonl"
    losses.unlink(missing_ok=True)
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "megatron_hybridnorm.rehearse", "--losses", str(losses)]
    if tree is not None:
        cmd += ["--megatron-lm", str(tree)]
    return [*cmd, script, *args], losses


def _environ(env: dict | None) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDNORM_")}
    environ.update(PYTHONWARNINGS="ignore", **(env or {}))
    return environ


def rehearse(out: Path, name: str, nproc: int, args: list[str], *,
             script: str = "pretrain_gpt.py", python: str = sys.executable,
             tree: Path | None = None, timeout: int = 600, env: dict | None = None) -> Run:
    """Run Megatron-LM's ``script`` with ``args`` on ``nproc`` CPU ranks through the runner."""
    return rehearse_many(out, [dict(name=name, nproc=nproc, args=args, script=script,
                                    python=python, tree=tree, env=env)], timeout=timeout)[name]


def rehearse_many(out: Path, jobs: list[dict], timeout: int = 900) -> dict[str, Run]:
    """Several launches (``rehearse``'s arguments as dicts), as many at once as there are CPU
    cores for their ranks: most of a small launch is single-threaded start-up."""
    import time

    out.mkdir(parents=True, exist_ok=True)
    cores, pending, running, done = os.cpu_count() or 1, list(jobs), [], {}
    deadline = time.monotonic() + timeout
    while pending or running:
        while pending and (not running or sum(j["nproc"] for j, *_ in running)
                           + pending[0]["nproc"] <= cores):
            job = {"script": "pretrain_gpt.py", "python": sys.executable, "tree": None,
                   "env": None, **pending.pop(0)}
            cmd, losses = _command(out, job["name"], job["nproc"], job["args"], job["script"],
                                   job["python"], job["tree"])
            log = (out / f"{job['name']}.log").open("w")
            log.write(" ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=_environ(job["env"]), stdout=log,
                                    stderr=subprocess.STDOUT, text=True)
            running.append((job, proc, log, losses))
        for item in list(running):
            job, proc, log, losses = item
            if proc.poll() is None and time.monotonic() < deadline:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            text = (out / f"{job['name']}.log").read_text().split("\n", 1)[1]
            done[job["name"]] = Run(job["args"], proc.returncode, text, losses)
            running.remove(item)
        time.sleep(0.2)
    return done


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (nothing: {})."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def importlib_find(name):
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


def megatron_model_of(save_folder):
    """A Megatron-LM checkpoint in the model megatron-core builds from its saved arguments."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_hybridnorm import compat
    from megatron_hybridnorm.inspect import checkpoint_folder

    folder = checkpoint_folder(save_folder)
    args = dist_checkpointing.load_common_state_dict(str(folder))["args"]
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.sequence_parallel = False
    config = core_transformer_config_from_args(args)
    build = compat.import_module(tuple(args.spec))
    layer_spec = build(config, vp_stage=None) if compat.SPEC_CALLABLES_ARE_CALLED else build
    model = GPTModel(config=config, transformer_layer_spec=layer_spec,
                     vocab_size=args.padded_vocab_size,
                     max_sequence_length=args.max_position_embeddings,
                     position_embedding_type=args.position_embedding_type,
                     rotary_base=args.rotary_base, rotary_percent=args.rotary_percent,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(state["model"])
    return model.eval()
