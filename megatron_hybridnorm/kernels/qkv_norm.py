"""Fused per-head Q/K/V RMSNorm in Triton, on Megatron's interleaved QKV projection output.

Megatron's ``linear_qkv`` writes, for each KV group, its P = np/ng query heads, then its key
head, then its value head: ``[tokens, groups, (P + 2) * head_dim]``. One pass reads that once,
normalizes every head (fp32) with the weight of its kind (one weight of width head_dim each for
q, k and v, shared by all heads), and writes q ``[tokens, groups * P, head_dim]``, k and v
``[tokens, groups, head_dim]`` contiguously. Backward writes the gradient of the projection
output and reduces the three weight gradients in fp32 (per-program partial sums, then torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_HEAD_DIM
from .rmsnorm import _empty

GROUPS_PER_PROGRAM = 8


@triton.jit
def _fwd(X, W, Q, K, V, RSTD, n_rows, P, hd, eps, offset,
         HB: tl.constexpr, GB: tl.constexpr, NORM_V: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.arange(0, GB)[:, None]          # head within the group
    d = tl.arange(0, HB)[None, :]          # position within the head
    G = P + 2
    mask = (h < G) & (d < hd)
    kind = tl.where(h < P, 0, tl.where(h == P, 1, 2))   # 0: q, 1: k, 2: v
    w = tl.load(W + kind * hd + d, mask=mask, other=0.0).to(tl.float32) + offset
    normed = (h < P + 1) | NORM_V
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            x = tl.load(X + row * G * hd + h * hd + d, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / hd + eps)      # [GB]
            tl.store(RSTD + row * G + tl.arange(0, GB), rstd, mask=tl.arange(0, GB) < G)
            y = tl.where(normed, x * rstd[:, None] * w, x)
            tl.store(Q + row * P * hd + h * hd + d, y.to(Q.dtype.element_ty), mask=mask & (h < P))
            tl.store(K + row * hd + d + h * 0, y.to(K.dtype.element_ty), mask=mask & (h == P))
            tl.store(V + row * hd + d + h * 0, y.to(V.dtype.element_ty), mask=mask & (h == P + 1))


@triton.jit
def _bwd(X, W, DQ, DK, DV, RSTD, DX, DW_PART, n_rows, P, hd, offset,
         HB: tl.constexpr, GB: tl.constexpr, NORM_V: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.arange(0, GB)[:, None]
    d = tl.arange(0, HB)[None, :]
    G = P + 2
    mask = (h < G) & (d < hd)
    kind = tl.where(h < P, 0, tl.where(h == P, 1, 2))
    w = tl.load(W + kind * hd + d, mask=mask, other=0.0).to(tl.float32) + offset
    normed = (h < P + 1) | NORM_V
    dwq = tl.zeros([HB], dtype=tl.float32)
    dwk = tl.zeros([HB], dtype=tl.float32)
    dwv = tl.zeros([HB], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            x = tl.load(X + row * G * hd + h * hd + d, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DQ + row * P * hd + h * hd + d, mask=mask & (h < P), other=0.0)
            dy += tl.load(DK + row * hd + d + h * 0, mask=mask & (h == P), other=0.0)
            dy += tl.load(DV + row * hd + d + h * 0, mask=mask & (h == P + 1), other=0.0)
            dy = dy.to(tl.float32)
            rstd = tl.load(RSTD + row * G + tl.arange(0, GB), mask=tl.arange(0, GB) < G,
                           other=0.0)[:, None]
            xhat = x * rstd
            wdy = dy * w
            c = tl.sum(xhat * wdy, axis=1)[:, None] / hd
            dx = tl.where(normed, (wdy - xhat * c) * rstd, dy)
            tl.store(DX + row * G * hd + h * hd + d, dx.to(DX.dtype.element_ty), mask=mask)
            contrib = dy * xhat
            dwq += tl.sum(tl.where(h < P, contrib, 0.0), axis=0)
            dwk += tl.sum(tl.where(h == P, contrib, 0.0), axis=0)
            dwv += tl.sum(tl.where(h == P + 1, contrib, 0.0), axis=0)
    dcols = tl.arange(0, HB)
    base = DW_PART + pid * 3 * hd
    tl.store(base + dcols, dwq, mask=dcols < hd)
    tl.store(base + hd + dcols, dwk, mask=dcols < hd)
    tl.store(base + 2 * hd + dcols, dwv, mask=dcols < hd)


def _grid(rows: int) -> int:
    return triton.cdiv(rows, GROUPS_PER_PROGRAM)


class _QKVNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixed, wq, wk, wv, heads_per_group, head_dim, eps, offset, norm_v):
        *lead, groups, width = mixed.shape
        P, hd = heads_per_group, head_dim
        x = mixed.reshape(-1, width).contiguous()
        rows = x.shape[0]
        w = torch.stack([wq.float(), wk.float(), wv.float() if norm_v else wk.float()])
        q = _empty((rows, P * hd), mixed.dtype, mixed.device)
        k = _empty((rows, hd), mixed.dtype, mixed.device)
        v = _empty((rows, hd), mixed.dtype, mixed.device)
        rstd = _empty((rows, P + 2), torch.float32, mixed.device)
        meta = dict(HB=triton.next_power_of_2(hd), GB=triton.next_power_of_2(P + 2),
                    NORM_V=norm_v, ROWS=GROUPS_PER_PROGRAM)
        _fwd[(_grid(rows),)](x, w, q, k, v, rstd, rows, P, hd, eps, offset, **meta)
        ctx.save_for_backward(x, w, rstd)
        ctx.meta, ctx.args = meta, (P, hd, offset, norm_v, tuple(lead), groups)
        ctx.dtypes = (wq.dtype, wk.dtype, wv.dtype)
        return (q.view(*lead, groups * P, hd), k.view(*lead, groups, hd),
                v.view(*lead, groups, hd))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, w, rstd = ctx.saved_tensors
        P, hd, offset, norm_v, lead, groups = ctx.args
        rows = x.shape[0]
        dx = _empty(x.shape, x.dtype, x.device)
        dw_part = _empty((_grid(rows), 3, hd), torch.float32, x.device)
        _bwd[(_grid(rows),)](
            x, w, dq.reshape(rows, P * hd).contiguous(), dk.reshape(rows, hd).contiguous(),
            dv.reshape(rows, hd).contiguous(), rstd, dx, dw_part, rows, P, hd, offset,
            **ctx.meta)
        dw = dw_part.sum(0)
        dwq, dwk, dwv = (g.to(t) for g, t in zip(dw, ctx.dtypes))
        return (dx.view(*lead, groups, (P + 2) * hd), dwq, dwk, dwv if norm_v else None,
                None, None, None, None, None)


def qkv_norm(mixed: torch.Tensor, wq, wk, wv, *, heads_per_group: int, head_dim: int,
             eps: float, zero_centered: bool = False):
    """(q, k, v) from Megatron's grouped QKV output ``[..., groups, (P + 2) * head_dim]``, each
    head RMS-normed with its kind's weight; ``wv=None`` leaves v unnormalized."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the fused Q/K/V norm supports head_dim up to {MAX_HEAD_DIM}")
    norm_v = wv is not None
    return _QKVNorm.apply(mixed, wq, wk, wv if norm_v else wk, heads_per_group, head_dim,
                          eps, 1.0 if zero_centered else 0.0, norm_v)
