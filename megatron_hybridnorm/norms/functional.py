"""The one normalization function every norm module here calls: fp32 math, output in the input
dtype. RMSNorm on CUDA runs this package's Triton kernel (``kernels/``); LayerNorm on CUDA uses
Apex's fused kernels when Apex is installed; everything else uses torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import use_triton

try:
    from apex.normalization.fused_layer_norm import (
        FusedLayerNormAffineMixedDtypesFunction,
        FusedRMSNormAffineMixedDtypesFunction,
    )

    HAVE_APEX = True
except ImportError:  # Apex is optional (not on PyPI)
    HAVE_APEX = False


def rms_norm(x, weight, eps, zero_centered_gamma):
    from ..kernels.rmsnorm import rms_norm as triton_rms_norm  # Triton is imported on demand

    return triton_rms_norm(x, weight, eps, zero_centered_gamma)


def add_rms_norm(x, a, a_bias, weight, eps, zero_centered_gamma, dropout_p):
    from ..kernels.rmsnorm import add_rms_norm as triton_add_rms_norm

    return triton_add_rms_norm(x, a, a_bias, weight, eps, zero_centered_gamma, dropout_p)


def normalize(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
    zero_centered_gamma: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """RMSNorm or LayerNorm over the last dim, computed in fp32 and cast back.

    With ``zero_centered_gamma`` the stored weight is gamma - 1 (Megatron's convention).
    ``impl``: "auto" (see the module's docstring; ``HYBRIDNORM_KERNELS`` forces Triton or torch),
    "apex" or "torch".
    """
    if impl == "auto" and kind == "RMSNorm" and use_triton(x):
        return rms_norm(x, weight, eps, zero_centered_gamma)
    w = weight.float()
    if zero_centered_gamma:
        w = w + 1.0
    width = (x.shape[-1],)
    if impl == "apex" or (impl == "auto" and HAVE_APEX and x.is_cuda):
        if kind == "RMSNorm":
            y = FusedRMSNormAffineMixedDtypesFunction.apply(x, w, width, eps, False)
        else:
            y = FusedLayerNormAffineMixedDtypesFunction.apply(x, w, bias.float(), width, eps, False)
        return y.to(x.dtype)
    xf = x.float()
    if kind == "RMSNorm":
        y = F.rms_norm(xf, width, w, eps)
    else:
        y = F.layer_norm(xf, width, w, None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def add_normalize(
    residual: torch.Tensor,
    out: torch.Tensor,
    out_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
    zero_centered_gamma: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``normalize(residual + dropout(out + out_bias))``: a sublayer's bias-dropout-add and the
    norm after it. RMSNorm on CUDA is one Triton pass (``kernels/rmsnorm.py``; its dropout mask
    is Philox's, not torch's); otherwise it runs as Megatron's unfused bias-dropout-add and the
    norm would, drawing the same random numbers."""
    if kind == "RMSNorm" and use_triton(out):
        return add_rms_norm(residual, out, out_bias, weight, eps, zero_centered_gamma, dropout_p)
    branch = out if out_bias is None else out + out_bias
    if dropout_p > 0:
        branch = F.dropout(branch, p=dropout_p, training=True)
    return normalize(residual + branch, weight, bias, eps, kind, zero_centered_gamma)


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None
