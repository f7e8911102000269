"""An init that does not depend on the parallel layout, for comparing parallel runs with
one-rank runs.

Megatron's CPU init (``use_cpu_initialization``) draws full matrices and keeps a shard, so it is
TP-invariant; but each pipeline stage, and each expert-parallel rank, restarts the random
stream. Here every weight is drawn at full size from a generator seeded by its *global* name
(global layer number, global expert index), with the config's init methods, and each rank keeps
its shard. Biases are zeroed and norm weights left as built.
"""

from __future__ import annotations

import re
import zlib

import torch

from megatron_hybridnorm.norms.names import is_norm_parameter
from megatron_hybridnorm.transformer.deepnorm import deepnorm_init

_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"(\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")


def global_name(model, name: str, p) -> str:
    """A parameter's name as a one-rank model would call it (global layer and expert index)."""
    from megatron.core import parallel_state

    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if m:
        layer = model.decoder.layers[int(m.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
    if getattr(p, "allreduce", True):  # not an expert parameter
        return name
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    num_local = model.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    shift = lambda i: str(ep_rank * num_local + int(i))  # noqa: E731
    name = _LOCAL_EXPERT.sub(lambda m: f".local_experts.{shift(m.group(1))}.", name)
    return _GROUPED_EXPERT.sub(lambda m: m.group(1) + shift(m.group(2)), name)


def layout_invariant_init(model, config, seed: int) -> None:
    """Re-draw ``model``'s weights (a GPTModel stage) independently of TP, PP and EP."""
    from megatron.core import parallel_state

    tied = model.share_embeddings_and_output_weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm_parameter(name):
                continue
            key = global_name(model, name, p)
            if tied and key == "output_layer.weight":
                key = "embedding.word_embeddings.weight"  # the last stage's copy of it
            expert = not getattr(p, "allreduce", True)
            if expert:
                tp = parallel_state.get_expert_tensor_parallel_world_size()
                rank = parallel_state.get_expert_tensor_parallel_rank()
            else:
                tp = parallel_state.get_tensor_model_parallel_world_size()
                rank = parallel_state.get_tensor_model_parallel_rank()
            _draw(p, key, config, seed, tp, rank)
        for layer in model.decoder.layers:  # DeepNorm's init scales what was drawn
            if getattr(layer, "deepnorm_blocks", None) is not None:
                deepnorm_init(layer, layer.deepnorm_blocks)


def _draw(p, name: str, config, seed: int, tp: int, rank: int) -> None:
    if name.endswith(".bias") or re.search(r"\.bias\d*$", name):
        p.zero_()  # as Megatron initializes biases
        return
    if re.search(r"(linear_proj|linear_fc2)\.weight\d*$", name):
        init = config.output_layer_init_method
    elif name.startswith("embedding."):
        init = config.embedding_init_method
    else:
        init = config.init_method
    full = torch.empty(full_shape(p, tp), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # Megatron's init methods draw from the global RNG
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        init(full)
    p.copy_(shard(p, full, tp, rank).to(p.dtype))


def full_shape(p, tp: int) -> list[int]:
    """The TP=1 shape of a parameter that may be split over ``tp`` ranks."""
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    return shape


def shard(p, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's part of a parameter's TP=1 tensor, as Megatron splits it (strided: a
    fused weight such as SwiGLU's fc1 keeps each of its ``partition_stride`` parts split)."""
    if not getattr(p, "tensor_model_parallel", False):
        return full
    stride = getattr(p, "partition_stride", 1)
    chunks = full.chunk(tp * stride, dim=p.partition_dim)
    return torch.cat(chunks[rank::tp], dim=p.partition_dim)


def gather_full(p, t):
    """The TP=1 tensor (on the CPU) for a parameter's (possibly TP-sharded) local tensor ``t``."""
    if not getattr(p, "tensor_model_parallel", False):
        return t.detach().cpu().clone()
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    stride = getattr(p, "partition_stride", 1)
    pieces = [part.cpu().chunk(stride, dim=p.partition_dim) for part in parts]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(size)],
                     dim=p.partition_dim)
