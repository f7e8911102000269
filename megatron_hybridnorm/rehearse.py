"""Rehearse a Megatron-LM launch on a machine without a GPU: Megatron-LM's own ``pretrain_gpt.py``
or ``pretrain_hybrid.py``, unchanged, at tiny sizes, with this package's ``--spec``.

    torchrun --nproc-per-node 2 -m megatron_hybridnorm.rehearse [--megatron-lm DIR] \\
        pretrain_gpt.py --spec megatron_hybridnorm.entrypoints hybridnorm_star ... \\
        --transformer-impl local --mock-data --tokenizer-type NullTokenizer

The command line after the script's name is the one the cluster will get, at a size a laptop
can run: Megatron-LM parses it, checks it, builds the model from ``--spec``, trains, saves and
resumes as it would there. What it cannot show: Transformer Engine and FP8 (local modules only),
NCCL (gloo runs the collectives), and anything about GPU speed or numerics.

Where Megatron-LM assumes a GPU, a handful of stand-ins apply (``harness.cpu.use_cpu`` and
``stand_ins`` below), each printed at start-up: no other line of Megatron-LM is changed.
Megatron-LM is found with ``--megatron-lm DIR`` or ``$MEGATRON_LM`` (a checkout, or any folder
holding its scripts and ``megatron/training``); megatron-core comes from the installed wheel.
Before handing over, a ``--spec`` is imported here, because Megatron-LM before 0.20 logs a
failed import and silently trains its default model instead.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

SCRIPTS = ("pretrain_gpt.py", "pretrain_hybrid.py")
ENV = "MEGATRON_LM"


class RehearsalError(SystemExit):
    """A launch this runner refuses before Megatron-LM starts: exit 1 with the fix."""

    def __init__(self, message: str):
        super().__init__(f"hybridnorm-rehearse: error: {message}")


def find_megatron_lm(where: str | None, script: str) -> Path:
    """The folder holding Megatron-LM's ``script`` (--megatron-lm, else $MEGATRON_LM)."""
    if not where:
        raise RehearsalError(
            f"where is Megatron-LM? pass --megatron-lm DIR or set {ENV}=DIR, DIR a Megatron-LM "
            f"checkout (git clone of NVIDIA/Megatron-LM at the tag of your megatron-core) or "
            f"any folder holding its {script} and megatron/training")
    folder = Path(where).expanduser().resolve()
    if not (folder / script).is_file():
        raise RehearsalError(f"{folder} holds no {script}: pass the root of a Megatron-LM "
                             f"checkout (--megatron-lm DIR or {ENV}=DIR)")
    return folder


def spec_of(args: list[str]) -> tuple[str, str] | None:
    """The (module, name) of ``--spec MODULE NAME`` on the command line, if any."""
    if "--spec" not in args:
        return None
    i = args.index("--spec")
    if len(args) < i + 3 or args[i + 1].startswith("--") or args[i + 2].startswith("--"):
        raise RehearsalError("--spec takes two values, MODULE NAME (for example --spec "
                             "megatron_hybridnorm.entrypoints hybridnorm_star)")
    return args[i + 1], args[i + 2]


def check_spec(spec: tuple[str, str]) -> None:
    """Import the --spec module as Megatron-LM will, and refuse a failed import: Megatron-LM
    before 0.20 logs it and trains its default model instead. (A name the module lacks is
    Megatron-LM's to find: this package's entry-point modules then name the schemes.)"""
    import importlib

    module, name = spec
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise RehearsalError(
            f"--spec {module} {name}: {module} does not import ({e}); Megatron-LM before 0.20 "
            "would log this and train its default Pre-Norm model instead") from None


def world_of_one() -> None:
    """Without torchrun: the environment torchrun gives a single process."""
    import socket

    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def stand_ins(on_gpu: bool) -> list[str]:
    """Point Megatron-LM's GPU assumptions at the CPU; return what was done, one line each."""
    done = []
    import megatron.core.datasets.utils as dataset_utils
    from megatron.core.datasets import helpers_cpp  # noqa: F401 - the wheel's built helper

    # the wheel ships the built helper but not the Makefile that start-up runs
    dataset_utils.compile_helpers = lambda: None
    done.append("megatron.core.datasets.utils.compile_helpers: the wheel's built helper, no make")
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # 0.16 without TE: the MoE router's NameError
        moe_utils.te_general_gemm = None
        done.append("megatron.core.transformer.moe.moe_utils.te_general_gemm = None (megatron-core "
                    "0.16 leaves it undefined without Transformer Engine)")
    if on_gpu:
        return done
    # here, not at the top: torch and megatron-core load after the arguments parse and
    # world_of_one() has set the ranks' environment (main)
    import torch

    from megatron_hybridnorm.harness.cpu import use_cpu

    use_cpu()
    done.append("torch.cuda streams, events, RNG and device='cuda' tensors: the CPU "
                "(megatron_hybridnorm.harness.cpu.use_cpu)")
    torch.cuda.device_count = lambda: 1  # below 1, Megatron-LM skips model-parallel init
    torch.cuda.set_device = lambda device: None
    done.append("torch.cuda.device_count() = 1, torch.cuda.set_device: no-op")
    from megatron.training import arguments, initialize, training

    arguments.get_device_arch_version = lambda: 9  # asked when TP or CP > 1: Hopper's answer
    done.append("get_device_arch_version() = 9 (Hopper)")
    original = initialize.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    initialize.initialize_megatron = training.initialize_megatron = initialize_megatron
    done.append("initialize_megatron(allow_no_cuda=True)")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return done


def record_losses(path: Path) -> None:
    """Append each training microbatch's loss to ``path`` as JSON lines (iteration as Megatron-LM
    logs it, microbatch, data-parallel rank, mean loss per token), from the ranks that compute it
    (last pipeline stage, first tensor- and context-parallel rank). The logged ``lm loss`` is a
    global-batch mean; these are the numbers a resumed run must reproduce exactly."""
    import functools
    import inspect
    import json

    import megatron.training
    import torch
    from megatron.training import training

    original = training.pretrain
    state = {"iteration": None, "microbatch": 0}

    def recording(loss_fn, iteration):
        def loss_and_record(*args, **kwargs):
            result = loss_fn(*args, **kwargs)
            from megatron.core import parallel_state as ps

            if (ps.get_tensor_model_parallel_rank() == 0
                    and ps.get_context_parallel_rank() == 0):
                loss, tokens = float(result[0]), float(result[1])
                with open(path, "a") as f:
                    f.write(json.dumps({"iteration": iteration, "microbatch": state["microbatch"],
                                        "dp_rank": ps.get_data_parallel_rank(),
                                        "loss": loss / tokens,
                                        "labels_sum": state["labels"]}) + "\n")
            state["microbatch"] += 1
            return result
        return loss_and_record

    class Peek:
        """The data iterator, noting a checksum of each batch's labels (the data a loss is of)."""

        def __init__(self, iterator):
            self.iterator = iterator

        def __iter__(self):
            return self

        def __next__(self):
            batch = next(self.iterator)
            if isinstance(batch, dict) and torch.is_tensor(batch.get("labels")):
                state["labels"] = int(batch["labels"].long().sum())
            return batch

    def wrap_forward_step(forward_step):
        @functools.wraps(forward_step)
        def forward_step_and_record(data_iterator, model, *args, **kwargs):
            state["labels"] = None
            if data_iterator is not None and model.training:
                data_iterator = Peek(data_iterator)
            output, loss_fn = forward_step(data_iterator, model, *args, **kwargs)
            if not model.training:  # evaluation
                return output, loss_fn
            iteration = megatron.training.get_args().curr_iteration + 1  # as the log counts
            if iteration != state["iteration"]:
                state.update(iteration=iteration, microbatch=0)
            return output, recording(loss_fn, iteration)
        return forward_step_and_record

    @functools.wraps(original)
    def pretrain(*args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        bound.arguments["forward_step_func"] = wrap_forward_step(
            bound.arguments["forward_step_func"])
        return original(*bound.args, **bound.kwargs)

    training.pretrain = megatron.training.pretrain = pretrain


def cpu_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """The command line with the one change a CPU needs (gloo for NCCL), and what changed."""
    if "--distributed-backend" in args:
        i = args.index("--distributed-backend")
        if args[i + 1:i + 2] == ["gloo"]:
            return args, []
        return args[:i] + ["--distributed-backend", "gloo"] + args[i + 2:], [
            f"--distributed-backend {args[i + 1] if i + 1 < len(args) else ''}: gloo"]
    return args + ["--distributed-backend", "gloo"], ["--distributed-backend gloo (NCCL needs "
                                                      "GPUs)"]


def parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m megatron_hybridnorm.rehearse",
        description="Rehearse a Megatron-LM launch on the CPU: its own script, unchanged, with "
                    "this package's --spec (under torchrun for several ranks)",
        epilog="Everything after the script's name is Megatron-LM's command line.")
    p.add_argument("--megatron-lm", metavar="DIR", default=os.environ.get(ENV),
                   help=f"the Megatron-LM tree (a checkout of the tag of the installed "
                        f"megatron-core); default ${ENV}")
    p.add_argument("--losses", metavar="FILE", type=Path,
                   help="append each training microbatch's loss here (JSON lines), to compare "
                        "a resumed run with an uninterrupted one")
    p.add_argument("script", choices=SCRIPTS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="Megatron-LM's arguments")
    return p


def main(argv: list[str] | None = None) -> None:
    ns = parser().parse_args(argv)
    losses, script, args = ns.losses, ns.script, ns.args
    root = find_megatron_lm(ns.megatron_lm, script)
    world_of_one()
    import torch

    on_gpu = torch.cuda.is_available()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        world = os.environ.get("WORLD_SIZE", "1")
        print(f"hybridnorm-rehearse: Megatron-LM's {script} from {root}, unchanged, "
              + ("on this machine's GPUs; only the dataset helper's build is skipped"
                 if on_gpu else
                 f"on the CPU over gloo ({world} process{'es' if world != '1' else ''}), "
                 "emulating one GPU per rank: a rehearsal of the launch, no proxy for GPU speed "
                 "or numerics (no Transformer Engine, FP8 or NCCL)"), flush=True)
    sys.path.insert(0, str(root))  # megatron.training from the folder, megatron.core the wheel
    changed = []
    if not on_gpu:
        args, changed = cpu_arguments(args)
    done = stand_ins(on_gpu)
    spec = spec_of(args)
    if spec:
        check_spec(spec)
    if rank0:
        for line in done + changed:
            print(f"hybridnorm-rehearse: stand-in: {line}", flush=True)
    if losses:
        record_losses(losses)
    sys.argv = [str(root / script), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
