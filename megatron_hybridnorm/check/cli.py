"""``python -m megatron_hybridnorm.check``: is a scheme right in this parallel layout, on this stack?

    torchrun --nproc-per-node 4 -m megatron_hybridnorm.check --scheme hybridnorm_star --tp 2 --pp 2

Every rank trains a small model of the scheme three optimizer steps at one rank's semantics
(tensor, pipeline, context and expert parallel sizes 1; every data-parallel rank sees the whole
batch), then in the requested layout, from the same weights (drawn by global parameter name) on
the same data; saves a dist checkpoint in the layout and loads it back at one rank. It prints
one table of checks (losses, gradients and parameters by group with the worst parameter named,
the norm layout of every global layer, norm weights across TP and DP replicas, the checkpoint),
writes it and what it ran on as JSON, and exits 1 if any check fails, 2 on a bad layout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from megatron_hybridnorm.schemes import SCHEMES
from megatron_hybridnorm.check import compare, faults
from megatron_hybridnorm.harness.cpu import use_cpu
from megatron_hybridnorm.kernels.report import paths
from megatron_hybridnorm.check import training
from megatron_hybridnorm.transformer.validate import SchemeMismatchError
from megatron_hybridnorm.harness.layout_init import gather_full, global_name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_hybridnorm.check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", default="hybridnorm_star", choices=SCHEMES)
    p.add_argument("--qkv-norm", default=None, choices=["head", "full"],
                   help="the span of the Q/K/V norms (default: the scheme's own)")
    p.add_argument("--backend", default="local", choices=["local", "te"],
                   help="local modules, or Transformer Engine's (needs TE)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--fp8", default=None, choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
                   help="FP8 recipe (TE backend; implies bf16)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE layers)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size (TE backend)")
    p.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    p.add_argument("--distopt", action="store_true", help="the distributed optimizer")
    p.add_argument("--layers-per-stage", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None,
                   help="write the JSON report here (rank 0); without it, only the table")
    p.add_argument("--ckpt-dir", default=None,
                   help="a folder every rank can reach (default: a temporary one, which "
                        "needs a filesystem shared by all nodes)")
    p.add_argument("--fault", choices=faults.FAULTS, help=argparse.SUPPRESS)  # negative controls
    return p


class LayoutError(ValueError):
    """A layout the world size or the options cannot hold."""


def validate(args, world: int) -> int:
    """The data-parallel size; raises ``LayoutError`` naming the fix."""
    model_parallel = args.tp * args.pp * args.cp
    if world % model_parallel:
        raise LayoutError(
            f"--tp {args.tp} x --pp {args.pp} x --cp {args.cp} = {model_parallel} does not divide "
            f"the {world} processes: start a multiple of {model_parallel} (torchrun "
            "--nproc-per-node / --nnodes), or lower --tp/--pp/--cp")
    dp = world // model_parallel
    if (dp * args.cp) % args.ep:
        raise LayoutError(
            f"--ep {args.ep} must divide the {dp * args.cp} data- and context-parallel ranks: "
            "start more processes, or lower --ep")
    if args.sp and args.tp == 1:
        raise LayoutError("--sp needs --tp > 1")
    if args.vpp and args.pp == 1:
        raise LayoutError("--vpp needs --pp > 1")
    if args.cp > 1 and args.backend != "te":
        raise LayoutError("--cp needs --backend te (megatron-core's local attention refuses "
                          "context parallelism)")
    if args.fp8 and args.backend != "te":
        raise LayoutError("--fp8 needs --backend te")
    if args.backend == "te":
        from megatron.core.extensions.transformer_engine import HAVE_TE

        if not HAVE_TE:
            raise LayoutError("--backend te needs Transformer Engine: pip install "
                              "'megatron-hybridnorm[te]', or use --backend local")
    return dp


def case_from(args) -> dict:
    stages = args.pp * (args.vpp or 1)
    config = {"num_layers": args.layers_per_stage * stages,
              "num_attention_heads": 4 * args.tp, "hidden_size": 64 * args.tp,
              "num_query_groups": 2 * args.tp, "ffn_hidden_size": 96 * args.tp}
    if args.vpp:
        config["batch_p2p_comm"] = False  # (see tests/test_pipeline.py: previous = next peer)
    if args.ep > 1:  # MoE layers (every other layer), experts split over the EP ranks
        config.update(num_moe_experts=2 * args.ep, moe_router_topk=2,
                      moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=1e-2,
                      moe_layer_freq=[i % 2 for i in range(config["num_layers"])])
    if args.dtype == "bf16" or args.fp8:
        config.update(bf16=True, params_dtype=torch.bfloat16)
    if args.fp8:
        config.update(fp8="hybrid" if args.fp8 in ("delayed", "tensorwise") else "e4m3",
                      fp8_recipe=args.fp8)
    return dict(scheme=args.scheme, qkv_norm=args.qkv_norm, sp=args.sp,
                groups=config.pop("num_query_groups"), config=config,
                microbatches=args.microbatches, distributed_optimizer=args.distopt,
                use_transformer_engine=args.backend == "te", fault=args.fault,
                replicate_batch=args.ep > 1)  # MoE load balancing depends on token grouping


def _init(layout, seed=1234):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.get("tp", 1),
        pipeline_model_parallel_size=layout.get("pp", 1),
        virtual_pipeline_model_parallel_size=layout.get("vpp"),
        context_parallel_size=layout.get("cp", 1),
        expert_model_parallel_size=layout.get("ep", 1),
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _setup_process_group() -> None:
    if not torch.cuda.is_available():
        use_cpu()
    if "RANK" not in os.environ:  # a plain `python -m ...`: a world of one
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def environment(args, dp: int, paths: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return dict(
        world_size=torch.distributed.get_world_size(), data_parallel=dp,
        backend=torch.distributed.get_backend(),
        devices=torch.cuda.get_device_name() if cuda else "cpu",
        versions=dict(torch=torch.__version__, cuda=torch.version.cuda,
                      megatron_core=v("megatron-core"), transformer_engine=v("transformer-engine"),
                      triton=v("triton")),
        norm_kernels=paths)


def run(args, dp: int) -> tuple[list[compare.Check], dict]:
    """Every rank: the three runs and its checks; returns (merged checks, kernel paths)."""
    case = case_from(args)
    reference_case = dict(case, sp=False, replicate_batch=True)
    _init({})
    reference = training.train_case(reference_case, args.steps)
    _init(dict(tp=args.tp, pp=args.pp, vpp=args.vpp, cp=args.cp, ep=args.ep))
    parallel = training.train_case(case, args.steps)
    kernel_paths = {f"layer {layer.layer_number}": paths(layer)
                    for m in parallel["chunks"] for layer in m.decoder.layers}
    ckpt = args.ckpt_dir or _shared_tempdir()
    training.save(parallel["chunks"], ckpt)
    torch.distributed.barrier()
    _init({})

    try:
        loaded = training.load(reference_case, ckpt)
        reloaded = {global_name(m, n, p): gather_full(p, p.detach()) for m in loaded
                    for n, p in m.named_parameters()}
    except SchemeMismatchError as e:  # every rank reads the same checkpoint metadata
        reloaded = f"refused: {str(e)[:300]}"
    precision = "fp8" if args.fp8 else args.dtype
    mine = compare.compare(reference, parallel, reloaded, precision,
                           grads=not args.distopt)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    if args.ckpt_dir is None and torch.distributed.get_rank() == 0:
        shutil.rmtree(ckpt, ignore_errors=True)  # the temporary checkpoint
    return compare.merge(everyone), kernel_paths


def _shared_tempdir() -> str:
    """A temporary folder made by rank 0, its name sent to every rank."""
    name = [tempfile.mkdtemp(prefix="hybridnorm-check-") if torch.distributed.get_rank() == 0
            else None]
    torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.fp8:
        args.dtype = "bf16"
    _setup_process_group()
    rank0 = torch.distributed.get_rank() == 0
    try:
        dp = validate(args, torch.distributed.get_world_size())
    except LayoutError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    t0 = time.monotonic()
    checks, kernel_paths = run(args, dp)
    ok = all(c.ok for c in checks)
    if rank0:
        layout = (f"{args.scheme} on {args.backend} ({'fp8 ' + args.fp8 if args.fp8 else args.dtype}"
                  f"), TP {args.tp} x PP {args.pp}{f' (VPP {args.vpp})' if args.vpp else ''} x "
                  f"CP {args.cp} x EP {args.ep} x DP {dp}{', SP' if args.sp else ''}"
                  f"{', distributed optimizer' if args.distopt else ''}")
        env = environment(args, dp, kernel_paths)
        print(f"megatron-hybridnorm check: {layout}; {env['world_size']} ranks, "
              f"{env['backend']}, {env['devices']}")
        print(compare.table(checks))
        print(f"{'PASS' if ok else 'FAIL'}: {sum(c.ok for c in checks)}/{len(checks)} checks "
              f"in {time.monotonic() - t0:.0f} s"
              f"{f'; {args.out}' if args.out else ' (--out PATH writes the JSON report)'}",
              flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(layout=layout, args=vars(args), ok=ok, environment=env,
                               checks=[c.row() for c in checks]), f, indent=2)
    return 0 if ok else 1


def entry() -> None:
    code = main()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(code)
