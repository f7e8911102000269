"""Training the small model in this process's parallel layout with Megatron's DDP, optimizer and
forward-backward schedule, and checkpointing it: what the check command and the multi-process
tests run on every rank.

A *case* is a dict: ``scheme``; ``pattern`` (a HybridModel's layer pattern; GPTModel without);
``qkv_norm``; ``sp``; ``groups`` (query groups);
``qk_layernorm``; ``config`` (TransformerConfig overrides); ``microbatches`` (2 sequences each,
split over data-parallel ranks, or whole on each with ``replicate_batch``);
``distributed_optimizer``; ``ddp`` (DistributedDataParallelConfig overrides);
``use_transformer_engine``; and test-only faults (``faults.py``).
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_hybridnorm.schemes import get_scheme
from megatron_hybridnorm.harness.layout_init import gather_full, global_name, layout_invariant_init
from megatron_hybridnorm.norms.names import DEPTH_SCALE, is_norm_parameter
from megatron_hybridnorm.check import faults
from megatron_hybridnorm.check.builders import (batch, build_gpt, build_hybrid, randomize_norms,
                                             small_config)
from megatron_hybridnorm.harness.steps import forward_step, mean_over_batch, microbatches
from megatron_hybridnorm.models.detection import check_checkpoint


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _identical(tensor, group) -> bool:
    copies = [torch.empty_like(tensor) for _ in range(group.size())]
    torch.distributed.all_gather(copies, tensor.contiguous(), group=group)
    return all(torch.equal(c, copies[0]) for c in copies)


def layer_slots(layer) -> tuple:
    """What actually sits in a built layer's norm slots (class names; None where absent), and
    LayerNorm Scaling's depth scale (None without)."""
    att = getattr(layer, "self_attention", None)  # an FFN-only layer of a HybridModel: Identity
    name = lambda m: None if m is None else type(m).__name__  # noqa: E731
    slot = lambda m, n: name(getattr(m, n, None))  # noqa: E731
    scale = getattr(layer, DEPTH_SCALE, None)
    return (slot(layer, "input_layernorm"), slot(att, "q_layernorm"), slot(att, "k_layernorm"),
            slot(att, "v_layernorm"), slot(layer, "self_attn_output_layernorm"),
            slot(layer, "pre_mlp_layernorm"), slot(layer, "mlp_output_layernorm"),
            slot(layer, "post_mlp_layernorm"), None if scale is None else round(float(scale), 6))


def build_chunks(config, case):
    """This rank's model chunks (one per virtual pipeline stage), laid out by Megatron, with
    weights drawn by global name (the same model at every layout), on this rank's device."""
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size
    options = get_scheme(case["scheme"]).options_from(qkv_norm=case.get("qkv_norm"))
    options.update(faults.build_options(case))
    chunks = []
    for vp in range(vpp or 1):
        stage = vp if vpp else None
        build = (partial(build_hybrid, pattern=case["pattern"]) if case.get("pattern")
                 else build_gpt)
        model = build(
            config, case["scheme"], vp_stage=stage,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            use_transformer_engine=case.get("use_transformer_engine", False), **options)
        layout_invariant_init(model, config, seed=0)  # the same weights at every layout
        randomize_norms(model)
        faults.apply(case, model)
        chunks.append(model.to(device()))
    return chunks


def case_config(case):
    """The case's TransformerConfig in this process's parallel layout."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    return small_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        pipeline_dtype=case.get("config", {}).get("params_dtype", torch.float32),
        sequence_parallel=case.get("sp", False) and tp > 1,
        num_query_groups=case.get("groups", 2),
        qk_layernorm=case.get("qk_layernorm", False),
        **case.get("config", {}),
    )


def train_case(case: dict, steps: int = 3) -> dict:
    """Train one case for ``steps`` optimizer steps on this rank's parallel layout.

    Returns the losses, this rank's full (TP-gathered) gradients of step 1 after
    ``finalize_model_grads`` under their one-rank names (with the distributed optimizer only this
    rank's shard of them is reduced), its full parameters after the last step, what sits in each
    layer's norm slots, and whether the replicated norm weights are bitwise identical across the
    TP group and across the DP group after the last step.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    config = case_config(case)
    chunks = build_chunks(config, case)
    distopt = case.get("distributed_optimizer", False)
    ddp_options = case.get("ddp", {})  # e.g. overlap_grad_reduce, overlap_param_gather, bucket_size
    ddps = [DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distopt, **ddp_options), m)
        for m in chunks]
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.1, clip_grad=1.0,
                        use_distributed_optimizer=distopt,
                        bf16=config.bf16, params_dtype=config.params_dtype), ddps)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [d.no_sync for d in ddps] if len(ddps) > 1 else ddps[0].no_sync
    fwd_bwd = get_forward_backward_func()
    micro = 2
    tokens, labels, _ = batch(b=micro * case.get("microbatches", 1))
    if case.get("replicate_batch"):
        # every DP rank sees the whole batch: needed where a loss depends on how tokens are
        # grouped on a rank (MoE load balancing), to compare with one rank exactly
        mbs = [(tokens[i:i + micro], labels[i:i + micro]) for i in range(0, len(tokens), micro)]
    else:
        mbs = microbatches(tokens, labels, micro)
    dev = device()
    torch.manual_seed(1234)  # every case starts from the same random state: the same dropout
    model_parallel_cuda_manual_seed(1234)
    losses, grads = [], {}
    for step in range(steps):
        for d in ddps:
            d.zero_grad_buffer()
        opt.zero_grad()
        out = fwd_bwd(
            forward_step_func=partial(forward_step, dev),
            data_iterator=[iter(mbs) for _ in ddps] if len(ddps) > 1 else iter(mbs),
            model=ddps, num_microbatches=len(mbs), seq_length=tokens.shape[1],
            micro_batch_size=micro, forward_only=False)
        losses.append(mean_over_batch(out, dev))
        if step == 0:
            for m in chunks:
                grads.update({global_name(m, n, p): gather_full(p, p.main_grad)
                              for n, p in m.named_parameters()})
        opt.step()
    if ddp_options.get("overlap_param_gather"):  # the last step's parameters, gathered now
        for d in ddps:
            d.start_param_sync(force_sync=True)

    tp_same = dp_same = True
    for m in chunks:
        for name, p in m.named_parameters():
            if is_norm_parameter(name):
                dp_same &= _identical(p.detach(), ps.get_data_parallel_group())
                if not getattr(p, "tensor_model_parallel", False):
                    tp_same &= _identical(p.detach(), ps.get_tensor_model_parallel_group())
    slots = {layer.layer_number - 1: layer_slots(layer) for m in chunks
             for layer in m.decoder.layers}
    params = {global_name(m, n, p): gather_full(p, p.detach()) for m in chunks
              for n, p in m.named_parameters()}
    return {"losses": losses, "grads": grads, "params": params, "slots": slots,
            "norms_identical": tp_same, "norms_identical_dp": dp_same, "chunks": chunks}


def train_cases(cases: list[dict], steps: int = 3) -> list[dict]:
    """``train_case`` for each case, without the model chunks (for sending between
    processes)."""
    return [{k: v for k, v in train_case(c, steps).items() if k != "chunks"} for c in cases]


def eval_loss(chunks) -> float:
    """Forward-only loss on the test batch, through Megatron's schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens, labels, _ = batch(b=2)
    mbs = [(tokens[:1], labels[:1]), (tokens[1:], labels[1:])]  # 2: interleaving needs M >= PP
    dev = device()
    for m in chunks:
        m.eval()
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=partial(forward_step, dev),
            data_iterator=[iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs),
            model=chunks, num_microbatches=2, seq_length=tokens.shape[1], micro_batch_size=1,
            forward_only=True)
    return mean_over_batch(out, dev)


def sharded_state(chunks):
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    state = {}
    for i, m in enumerate(chunks):  # Megatron-LM's naming for virtual pipeline chunks
        state[f"model{i}"] = m.sharded_state_dict()
    return state


def save(chunks, path: str) -> None:
    """A dist checkpoint of this layout's chunks at ``path`` (made by rank 0)."""
    import os

    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_state(chunks), path)


def load(case, path: str):
    """The case's chunks at this rank's layout, with other weights, then loaded from ``path``
    (after checking that the checkpoint holds the same scheme)."""
    from megatron.core import dist_checkpointing

    chunks = build_chunks(case_config(case), case)
    for m in chunks:  # make sure the weights come from the checkpoint
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.5)
    check_checkpoint(chunks, path)
    state = dist_checkpointing.load(sharded_state(chunks), path)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
    else:
        for j, m in enumerate(chunks):
            m.load_state_dict(state[f"model{j}"])
    return chunks


def save_and_eval(cases: list[dict], root: str) -> list[float]:
    """Save each case's (randomized) model with dist_checkpointing; its loss on the test batch."""
    losses = []
    for i, case in enumerate(cases):
        chunks = build_chunks(case_config(case), case)
        save(chunks, f"{root}/case{i}")
        losses.append(eval_loss(chunks))
    return losses


def load_and_eval(cases: list[dict], root: str) -> list[float]:
    """Build each case at this rank's layout with other weights, load its checkpoint, evaluate."""
    return [eval_loss(load(case, f"{root}/case{i}")) for i, case in enumerate(cases)]
