"""The parameters every norm here owns, in Megatron's layout: ``weight`` and, for LayerNorm, ``bias``;
DyT (Zhu et al. 2025, "Transformers without Normalization", arXiv 2503.10622) has ``weight``
(gamma), ``bias`` (beta) and the learned scalar ``alpha``: y = gamma * tanh(alpha * x) + beta,
alpha starting at the paper's default 0.5."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hybridnorm.kernels.report import record
from megatron_hybridnorm.kernels.dispatch import kernel_setting
from megatron_hybridnorm.norms.functional import choose_impl, normalize

NORMALIZATIONS = ("RMSNorm", "LayerNorm", "DyT")
DYT_ALPHA_INIT = 0.5  # the DyT paper's default alpha_0


class NormBase(torch.nn.Module):
    def __init__(self, config: TransformerConfig, width: int, eps: float):
        super().__init__()
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization={config.normalization!r} is not supported by megatron-hybridnorm; "
                f"set TransformerConfig.normalization to one of {NORMALIZATIONS}"
            )
        self.kind = config.normalization
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(width))
        if self.kind in ("LayerNorm", "DyT"):
            self.bias = torch.nn.Parameter(torch.zeros(width))
        else:
            self.register_parameter("bias", None)
        if self.kind == "DyT":
            self.alpha = torch.nn.Parameter(torch.full((1,), DYT_ALPHA_INIT))
        else:
            self.register_parameter("alpha", None)
        self.kernels = kernel_setting()  # HYBRIDNORM_KERNELS, read once as the model is built

    def _normalize(self, x: torch.Tensor, weight=None, bias=None, alpha=None) -> torch.Tensor:
        impl, why = choose_impl(x, self.kind, self.kernels)
        record(self, f"{impl} ({why})")
        return normalize(
            x,
            self.weight if weight is None else weight,
            self.bias if bias is None else bias,
            self.eps,
            self.kind,
            self.zero_centered_gamma,
            impl,
            alpha=self.alpha if alpha is None else alpha,
        )

    # the tensor-parallel group of the module that owns this norm (its ``pg_collection.tp``),
    # set by the attention or layer that builds it; None: megatron-core's global TP group
    tp_group = None

    def tensor_parallel_group(self):
        from megatron.core import parallel_state

        return self.tp_group if self.tp_group is not None else \
            parallel_state.get_tensor_model_parallel_group()

    def extra_repr(self) -> str:
        return f"{self.kind}({self.weight.shape[0]}, eps={self.eps})"
