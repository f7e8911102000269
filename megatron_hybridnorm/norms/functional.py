"""The one normalization function every norm module here calls: fp32 math, output in the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
    zero_centered_gamma: bool = False,
) -> torch.Tensor:
    """RMSNorm or LayerNorm over the last dim, computed in fp32 and cast back.

    With ``zero_centered_gamma`` the stored weight is gamma - 1 (Megatron's convention).
    """
    w = weight.float()
    if zero_centered_gamma:
        w = w + 1.0
    xf = x.float()
    width = (x.shape[-1],)
    if kind == "RMSNorm":
        y = F.rms_norm(xf, width, w, eps)
    else:
        y = F.layer_norm(xf, width, w, None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None
