"""Norms on the residual stream: input, pre-MLP, post-MLP and final norms."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hybridnorm.kernels.report import record, report
from megatron_hybridnorm.norms.base import NormBase
from megatron_hybridnorm.norms.functional import add_normalize, choose_impl


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
        self.reports_itself = True  # which kernel it ran; a layer clears this for its norms

    output_scale: float | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                x_bias: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        """N(x); with ``residual``, N(residual + dropout(x + x_bias)): the bias-dropout-add of
        the sublayer whose output is x, fused into the norm (one Triton pass for RMSNorm on
        CUDA). ``HybridTransformerLayer`` passes them where the norm follows that add."""
        if residual is None:
            out = self._normalize(x)
        else:
            impl, why = choose_impl(x, self.kind, self.kernels)
            record(self, f"{impl} add + norm ({why})")
            out = add_normalize(residual, x, x_bias, self.weight, self.bias, self.eps, self.kind,
                                self.zero_centered_gamma, dropout_p, impl, alpha=self.alpha)
        if self.output_scale is not None:  # LayerNorm Scaling's 1/sqrt(l), set by the layer
            out = out * self.output_scale
        if self.reports_itself:
            self.reports_itself = False
            report(f"a norm outside the layers ({self.kind}, width {self.weight.shape[0]})", self)
        return out


class PostNorm(Norm):
    """A norm whose output is also the residual: returns ``(n, n)``.

    In ``pre_mlp_layernorm`` this is HybridNorm's FFN (n = N(y); out = n + FFN(n)) and the
    Post-Norm attention sublayer; ``TransformerLayer`` takes the second item as the residual.
    """

    returns_residual = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                x_bias: torch.Tensor | None = None,
                dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        n = super().forward(x, residual, x_bias, dropout_p)
        return n, n
