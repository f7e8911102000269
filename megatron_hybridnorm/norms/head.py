"""Q/K/V norms inside attention: per head (the paper's) or over the full projected width."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron_hybridnorm.kernels.report import record
from megatron_hybridnorm.norms.base import NormBase
from megatron_hybridnorm.norms.functional import ScaleGrad


class HeadNorm(NormBase):
    """One weight of width head_dim, shared by every head of q (or k, or v).

    Each tensor-parallel rank owns different heads, so its weight gradient is a partial sum;
    the full gradient is the sum over the TP group, taken once. Megatron's
    ``finalize_model_grads`` AVERAGES parameters marked ``average_gradients_across_tp_domain``
    over that group, in one coalesced all-reduce per step. Scaling the local gradient by the
    TP size in backward turns that average into the sum. This holds whatever
    ``config.qk_layernorm`` says (Megatron's name-based q/k sum is skipped for marked
    parameters), for GQA with tp > num_query_groups (each rank's copy of a KV head gets the
    part of the gradient from its own query heads), and with sequence parallelism (attention
    sees the whole sequence). It relies on ``finalize_model_grads``, as Megatron's q/k norms do.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps)
        self.tp_size = config.tensor_model_parallel_size
        for p in self.parameters():
            p.average_gradients_across_tp_domain = True

    def scaled(self, p: torch.Tensor | None) -> torch.Tensor | None:
        """A parameter as the forward uses it: its gradient scaled by the TP size."""
        if p is None or self.tp_size == 1:
            return p
        return ScaleGrad.apply(p, float(self.tp_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize(x, self.scaled(self.weight), self.scaled(self.bias),
                               self.scaled(self.alpha))


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward; every rank uses the sum, so backward sums the gradients too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        t = t.clone()
        torch.distributed.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthNorm(NormBase):
    """Normalizes over all heads of q (or of k, or of v) at once, as OLMo 2 does.

    Under tensor parallelism each rank holds a contiguous slice of the heads, so the weight is
    sharded like them and the statistics are summed over the TP group in forward (and their
    gradients in backward): the result equals TP=1 at any TP size. ``spans`` names the heads
    it covers: "query" (``num_attention_heads``) or "kv" (``num_query_groups``).
    """

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, *, spans: str
    ):
        heads = {"query": config.num_attention_heads, "kv": config.num_query_groups}[spans]
        tp = config.tensor_model_parallel_size
        if heads % tp:
            raise ValueError(
                f'qkv_norm="full" needs the {heads} heads it normalizes split evenly over '
                f"tensor_model_parallel_size={tp}; use a TP size that divides {heads}, or "
                'qkv_norm="head"'
            )
        self.head_dim = hidden_size
        self.global_width = heads * hidden_size
        super().__init__(config, heads // tp * hidden_size, eps)
        self.tp_size = tp
        for p in (self.weight, self.bias):
            if p is not None:
                set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        if self.alpha is not None:
            # DyT's one alpha is replicated, but each rank sees its own heads: its gradient is
            # summed over TP, as a per-head norm's weight is (HeadNorm)
            self.alpha.average_gradients_across_tp_domain = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., local heads, head_dim] -> one row of all local heads
        shape = x.shape
        xf = x.reshape(*shape[:-2], shape[-2] * shape[-1]).float()
        if self.kind == "DyT":  # elementwise: no statistics to sum over TP
            alpha = self.alpha if self.tp_size == 1 else ScaleGrad.apply(self.alpha,
                                                                         float(self.tp_size))
            return self._normalize(xf, alpha=alpha).to(x.dtype).reshape(shape)
        record(self, "torch (statistics over all heads"
               + (", all-reduced over TP)" if self.tp_size > 1 else ")"))
        group = self.tensor_parallel_group() if self.tp_size > 1 else None

        def total(t):
            return _AllReduceSum.apply(t, group) if group is not None else t

        if self.kind == "LayerNorm":
            mean = total(xf.sum(-1, keepdim=True)) / self.global_width
            xf = xf - mean
        var = total(xf.pow(2).sum(-1, keepdim=True)) / self.global_width
        w = self.weight.float() + (1.0 if self.zero_centered_gamma else 0.0)
        y = xf * torch.rsqrt(var + self.eps) * w
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(shape)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 0, "bias": 0},  # sharded over TP like the heads
            sharded_offsets,
            tp_group=self.tensor_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"],
        )
