"""What each rank runs in the multi-process tests (module-level, so spawned ranks can import it):
the check command's training (``megatron_hybridnorm.check.training``, one implementation) and a
few test-only functions."""

from __future__ import annotations

import torch

from megatron_hybridnorm.check.training import (  # noqa: F401 - what the tests call
    build_chunks,
    case_config,
    eval_loss,
    layer_slots,
    load_and_eval,
    save_and_eval,
    train_case,
    train_cases,
)


KERNELS = (("rmsnorm", "rms_norm"), ("rmsnorm", "add_rms_norm"), ("qkv_norm", "qkv_norm"),
           ("qkv_full_norm", "qkv_full_norm"))


def train_cases_counting_kernels(cases: list[dict], steps: int = 3) -> list[dict]:
    """``train_cases``, each result with the number of calls that reached each Triton kernel."""
    import importlib

    results = []
    for case in cases:
        calls = dict.fromkeys((name for _, name in KERNELS), 0)
        originals = []
        for module, name in KERNELS:
            mod = importlib.import_module(f"megatron_hybridnorm.kernels.{module}")
            original = getattr(mod, name)
            originals.append((mod, name, original))

            def counted(*a, _f=original, _n=name, **k):
                calls[_n] += 1
                return _f(*a, **k)

            setattr(mod, name, counted)
        try:
            result = {k: v for k, v in train_case(case, steps).items() if k != "chunks"}
            results.append({**result, "kernel_calls": calls})
        finally:
            for mod, name, original in originals:
                setattr(mod, name, original)
    return results


def fail_on_rank(bad: int) -> int:
    if torch.distributed.get_rank() == bad:
        raise RuntimeError(f"deliberate failure on rank {bad}")
    return torch.distributed.get_rank()


def hang_on_rank(bad: int) -> int:
    import time

    if torch.distributed.get_rank() == bad:
        time.sleep(3600)
    return torch.distributed.get_rank()


def full_qkv_norm_on_a_slice_of_heads(case):
    """This rank's share (its KV groups) of the full-width Q/K/V norm kernel, the statistics
    summed over the process group (gloo; Triton's interpreter on the CPU)."""
    from megatron_hybridnorm.kernels.qkv_full_norm import qkv_full_norm

    mixed, ws, grads, ng, P, hd = case
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per = ng // world
    lo, hi = rank * per, (rank + 1) * per
    mine = mixed[:, :, lo:hi].clone().requires_grad_(True)
    wl = [ws[0][lo * P * hd:hi * P * hd], ws[1][lo * hd:hi * hd], ws[2][lo * hd:hi * hd]]
    wl = [w.clone().requires_grad_(True) for w in wl]
    out = qkv_full_norm(mine, *wl, heads_per_group=P, head_dim=hd,
                        widths=(ng * P * hd, ng * hd), eps=1e-5,
                        group=torch.distributed.group.WORLD)
    local_grads = [grads[0][:, :, lo * P:hi * P], grads[1][:, :, lo:hi], grads[2][:, :, lo:hi]]
    torch.autograd.backward(out, local_grads)
    return [o.detach() for o in out], mine.grad, [w.grad for w in wl]


def check_commands(argvs: list[list[str]]) -> list[tuple[int, dict | None]]:
    """``python -m megatron_hybridnorm.check ARGV`` on this rank, for each ARGV in turn: (exit
    code, rank 0's JSON report)."""
    import json

    from megatron_hybridnorm.check.cli import main

    results = []
    for argv in argvs:
        code = main(argv)
        out = argv[argv.index("--out") + 1]
        report = None
        if torch.distributed.get_rank() == 0 and code in (0, 1):
            with open(out) as f:
                report = json.load(f)
        results.append((code, report))
    return results


def load_gpt_into_hybrid_and_eval(cases: list[dict], root: str, pattern: str) -> list[float]:
    """Each case's GPT checkpoint (saved by ``save_and_eval``) loaded into the HybridModel of
    the same scheme on ``pattern``, at this rank's layout; its loss on the test batch."""
    from megatron_hybridnorm.models.hybrid.gpt_checkpoint import load_gpt_checkpoint

    losses = []
    for i, case in enumerate(cases):
        hybrid = dict(case, pattern=pattern, config=dict(case.get("config", {}),
                                                         num_layers=len(pattern)))
        [model] = build_chunks(case_config(hybrid), hybrid)
        load_gpt_checkpoint(model, f"{root}/case{i}", pattern)
        losses.append(eval_loss([model]))
    return losses


def full_width_norm_on_the_models_tp_group(case):
    """FullWidthNorm on this rank's half of the heads, with the model's TP group (both ranks)
    while megatron-core's global TP group is this rank alone: its statistics must be summed
    over the model's group. Returns the output and the weight's gradient."""
    from megatron_hybridnorm.check.builders import small_config
    from megatron_hybridnorm.norms import FullWidthNorm

    x, w, grad = case
    rank = torch.distributed.get_rank()
    group = torch.distributed.new_group([0, 1])
    norm = FullWidthNorm(small_config(tensor_model_parallel_size=2), x.shape[-1], spans="query")
    heads = x.shape[-2] // 2
    with torch.no_grad():
        norm.weight.copy_(w[rank * heads * x.shape[-1]:(rank + 1) * heads * x.shape[-1]])
    norm.tp_group = group
    out = norm(x[..., rank * heads:(rank + 1) * heads, :])
    out.backward(grad[..., rank * heads:(rank + 1) * heads, :])
    return out.detach(), norm.weight.grad


def layer_spec_entry_point_stage(scheme: str, num_layers: int, vpp: int | None):
    """This pipeline rank's GPTModel chunks built from the entry point as Megatron-LM before
    0.19 builds them (the layer ModuleSpec as the spec): {global layer: its norm layout}."""
    from dataclasses import asdict

    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_hybridnorm import get_scheme
    from megatron_hybridnorm.check.builders import SEQ, VOCAB, small_config
    from megatron_hybridnorm.models.gpt import entrypoints

    spec = entrypoints._layer_spec_entry_point(get_scheme(scheme), getattr(entrypoints, scheme))
    config = small_config(num_layers=num_layers, pipeline_model_parallel_size=2,
                          virtual_pipeline_model_parallel_size=vpp, transformer_impl="local",
                          pipeline_dtype=torch.float32)
    found = {}
    for vp in range(vpp or 1):
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp) \
            if vpp else parallel_state.is_pipeline_first_stage()
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp) \
            if vpp else parallel_state.is_pipeline_last_stage()
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                         max_sequence_length=SEQ, position_embedding_type="rope",
                         pre_process=first, post_process=last,
                         vp_stage=vp if vpp else None)
        found.update({layer.layer_number - 1: asdict(layer.norms)
                      for layer in model.decoder.layers})
    return found
