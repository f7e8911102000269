"""What each rank runs in the multi-process tests (module-level, so spawned ranks can import it)."""

from __future__ import annotations

import torch

from helpers import batch, build_gpt, gather_full, randomize_norms, tiny_config
from megatron_hybridnorm.layout_init import global_name, layout_invariant_init


def _setup_training(model, config, lr=3e-3, distributed_optimizer=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
        ),
        model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.1, clip_grad=1.0,
                        use_distributed_optimizer=distributed_optimizer),
        [ddp],
    )
    return ddp, opt


def _break_v_norm_sync(model):
    """The naive V norm: no TP handling, as a plain module added to Megatron would be."""
    for name, module in model.named_modules():
        if name.endswith("v_layernorm"):
            module.tp_size = 1
            for p in module.parameters():
                del p.average_gradients_across_tp_domain


def train_case(case: dict, steps: int = 3) -> dict:
    """Train one configuration for ``steps`` optimizer steps on this rank's parallel layout.

    Returns the losses, the full (TP-gathered) gradients of step 1 after DDP and
    ``finalize_model_grads``, and whether every replicated norm weight is bitwise identical
    across the TP ranks after the last step.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    tp = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    config = tiny_config(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=case.get("sp", False) and tp > 1,
        num_query_groups=case.get("groups", 2),
        qk_layernorm=case.get("qk_layernorm", False),
        **case.get("config", {}),
    )
    options = {"qkv_norm": case["qkv_norm"]} if case.get("qkv_norm", "head") != "head" else {}
    model = build_gpt(config, case["scheme"], **options)
    layout_invariant_init(model, config, seed=0)  # the same weights at every layout
    randomize_norms(model)
    if case.get("break_v_norm_sync"):
        _break_v_norm_sync(model)
    ddp, opt = _setup_training(model, config)
    tokens, labels, pos = batch()
    losses, grads = [], {}
    for step in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(tokens, pos, None, labels=labels).mean()
        loss.backward()
        finalize_model_grads([ddp])
        if step == 0:
            grads = {global_name(model, n, p): gather_full(p, p.main_grad)
                     for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())

    identical = True
    group = parallel_state.get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        if "layernorm" in name and not getattr(p, "tensor_model_parallel", False):
            copies = [torch.empty_like(p) for _ in range(tp)]
            torch.distributed.all_gather(copies, p.detach().contiguous(), group=group)
            identical &= all(torch.equal(c, copies[0]) for c in copies)
    keep = torch.distributed.get_rank() == 0 or ep > 1  # EP ranks hold different experts
    return {"losses": losses, "grads": grads if keep else None, "norms_identical": identical}


def train_cases(cases: list[dict], steps: int = 3) -> list[dict]:
    return [train_case(c, steps) for c in cases]


def fail_on_rank(bad: int) -> int:
    if torch.distributed.get_rank() == bad:
        raise RuntimeError(f"deliberate failure on rank {bad}")
    return torch.distributed.get_rank()


def hang_on_rank(bad: int) -> int:
    import time

    if torch.distributed.get_rank() == bad:
        time.sleep(3600)
    return torch.distributed.get_rank()
