"""Norms on the residual stream: input, pre-MLP, post-MLP and final norms."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from .base import NormBase


class Norm(NormBase):
    """RMSNorm/LayerNorm over the hidden size.

    Under sequence parallelism each rank sees a slice of the sequence, so the weight gets a
    partial gradient; ``sequence_parallel`` on the parameter makes Megatron's
    ``finalize_model_grads`` sum it over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize(x)


class PostNorm(Norm):
    """A norm whose output is also the residual: returns ``(n, n)``.

    In ``pre_mlp_layernorm`` this is HybridNorm's FFN (n = N(y); out = n + FFN(n)) and the
    Post-Norm attention sublayer; ``TransformerLayer`` takes the second item as the residual.
    """

    returns_residual = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._normalize(x)
        return n, n
