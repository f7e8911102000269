"""The TransformerConfig of the GPTs this package's tools train (``hybridnorm-train``, the check):
SwiGLU, RMSNorm, no linear biases, no dropout, weights drawn on the CPU and no fused kernels that
need CUDA. Each tool passes its sizes and parallelism."""

from __future__ import annotations

import torch.nn.functional as F

BASE = dict(
    gated_linear_unit=True,
    activation_func=F.silu,
    normalization="RMSNorm",
    layernorm_epsilon=1e-5,
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    use_cpu_initialization=True,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
)


def gpt_config(**fields):
    """``TransformerConfig(**BASE, **fields)``; ``fields`` may override the base."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**{**BASE, **fields})
