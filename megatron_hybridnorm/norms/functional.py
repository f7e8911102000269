"""The one normalization function every norm module here calls: fp32 math, output in the input
dtype. ``choose_impl`` says which implementation runs and why: RMSNorm on CUDA runs this
package's Triton kernel (``kernels/``); LayerNorm on CUDA uses Apex's fused kernels when Apex is
installed; everything else uses torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybridnorm.kernels.dispatch import kernel_path

try:
    from apex.normalization.fused_layer_norm import (
        FusedLayerNormAffineMixedDtypesFunction,
        FusedRMSNormAffineMixedDtypesFunction,
    )

    HAVE_APEX = True
except ImportError:  # Apex is optional (not on PyPI)
    HAVE_APEX = False

IMPLS = ("triton", "apex", "torch")


def choose_impl(x: torch.Tensor, kind: str, *setting) -> tuple[str, str]:
    """(implementation, why) for normalizing ``x`` with a ``kind`` norm; ``setting``: the
    module's ``HYBRIDNORM_KERNELS`` from its build (``kernels.dispatch.kernel_path``)."""
    if kind == "RMSNorm":
        triton, why = kernel_path(x, *setting)
        if triton:
            return "triton", why
    else:
        why = f"{kind} (the kernels are RMSNorm)"
    if HAVE_APEX and kind != "DyT" and x.is_cuda and x.dtype != torch.float64:
        return "apex", f"Apex fused kernel; {why}"
    return "torch", why


def normalize(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
    zero_centered_gamma: bool = False,
    impl: str = "auto",
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm or LayerNorm over the last dim, or DyT elementwise (``alpha``: its scalar),
    computed in fp32 and cast back.

    With ``zero_centered_gamma`` the stored weight is gamma - 1 (Megatron's convention).
    ``impl``: "auto" (``choose_impl``), or one of ``IMPLS``.
    """
    if impl == "auto":
        impl, _ = choose_impl(x, kind)
    if impl == "triton":
        # here, not at the top: kernels/rmsnorm.py imports Triton, an optional dependency
        from megatron_hybridnorm.kernels.rmsnorm import rms_norm

        return rms_norm(x, weight, eps, zero_centered_gamma)
    w = weight.float()
    if zero_centered_gamma:
        w = w + 1.0
    width = (x.shape[-1],)
    if impl == "apex":
        if kind == "RMSNorm":
            y = FusedRMSNormAffineMixedDtypesFunction.apply(x, w, width, eps, False)
        else:
            y = FusedLayerNormAffineMixedDtypesFunction.apply(x, w, bias.float(), width, eps, False)
        return y.to(x.dtype)
    xf = x.float()
    if kind == "DyT":
        y = torch.tanh(alpha.float() * xf) * w + bias.float()
    elif kind == "RMSNorm":
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
    impl: str = "auto",
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """``normalize(residual + dropout(out + out_bias))``: a sublayer's bias-dropout-add and the
    norm after it. With ``impl`` "triton" (RMSNorm) one pass (``kernels/rmsnorm.py``; its dropout
    mask is Philox's, not torch's); otherwise Megatron's unfused bias-dropout-add and the norm,
    drawing the same random numbers as Megatron."""
    if impl == "auto":
        impl, _ = choose_impl(out, kind)
    if impl == "triton":
        from megatron_hybridnorm.kernels.rmsnorm import add_rms_norm  # Triton, as above

        return add_rms_norm(residual, out, out_bias, weight, eps, zero_centered_gamma, dropout_p)
    branch = out if out_bias is None else out + out_bias
    if dropout_p > 0:
        branch = F.dropout(branch, p=dropout_p, training=True)
    return normalize(residual + branch, weight, bias, eps, kind, zero_centered_gamma, impl,
                     alpha=alpha)


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None
