"""Fused per-head Q/K/V RMSNorm in Triton, on Megatron's interleaved QKV projection output.

Megatron's ``linear_qkv`` writes, for each KV group, its P = np/ng query heads, then its key
head, then its value head: ``[tokens, groups, (P + 2) * head_dim]``. One pass reads that once,
normalizes every head (fp32) with the weight of its kind (one weight of width head_dim each for
q, k and v, shared by all heads), and writes q ``[tokens, groups * P, head_dim]``, k and v
``[tokens, groups, head_dim]`` contiguously. Backward writes the gradient of the projection
output and reduces the three weight gradients in fp32 (per-program partial sums, then torch).

With ``rope`` the same pass rotates the normalized q and k (the norms come before RoPE), as
Megatron's ``apply_rotary_pos_emb`` would, in fp32: HybridNorm's attention pre-processing is then
one pass where Pre-Norm's is RoPE alone. Backward rotates the incoming gradient back first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_HEAD_DIM
from .rmsnorm import _empty

GROUPS_PER_PROGRAM = 8


@triton.jit
def _rope_pairs(d, rot, INTERLEAVED: tl.constexpr):
    """The partner of each position in the rotation and the sign of its term: RoPE maps
    y[d] -> y[d] cos[d] + sign[d] y[partner[d]] sin[d]; positions from ``rot`` on pass through."""
    if INTERLEAVED:
        partner = tl.where(d < rot, d ^ 1, d)
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    else:
        half = rot // 2
        partner = tl.where(d < half, d + half, tl.where(d < rot, d - half, d))
        sign = tl.where(d < half, -1.0, 1.0)
    return partner, sign


@triton.jit
def _fwd(X, W, Q, K, V, RSTD, COS, SIN, n_rows, P, hd, eps, offset, per_position, rot,
         HB: tl.constexpr, GB: tl.constexpr, NORM_V: tl.constexpr, ROWS: tl.constexpr,
         ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.arange(0, GB)[:, None]          # head within the group
    d = tl.arange(0, HB)[None, :]          # position within the head
    G = P + 2
    mask = (h < G) & (d < hd)
    kind = tl.where(h < P, 0, tl.where(h == P, 1, 2))   # 0: q, 1: k, 2: v
    w = tl.load(W + kind * hd + d, mask=mask, other=0.0).to(tl.float32) + offset
    normed = (h < P + 1) | NORM_V
    if ROPE:
        partner, sign = _rope_pairs(d, rot, INTERLEAVED)
        wp = tl.load(W + kind * hd + partner, mask=mask, other=0.0).to(tl.float32) + offset
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            x = tl.load(X + row * G * hd + h * hd + d, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / hd + eps)      # [GB]
            tl.store(RSTD + row * G + tl.arange(0, GB), rstd, mask=tl.arange(0, GB) < G)
            y = tl.where(normed, x * rstd[:, None] * w, x)
            if ROPE:  # q and k; the partner's normalized value is recomputed from its input
                xp = tl.load(X + row * G * hd + h * hd + partner, mask=mask,
                             other=0.0).to(tl.float32)
                yp = xp * rstd[:, None] * wp
                pos = row // per_position
                cs = tl.load(COS + pos * hd + d, mask=d < hd, other=1.0)
                sn = tl.load(SIN + pos * hd + d, mask=d < hd, other=0.0)
                y = tl.where(h < P + 1, y * cs + sign * yp * sn, y)
            tl.store(Q + row * P * hd + h * hd + d, y.to(Q.dtype.element_ty), mask=mask & (h < P))
            tl.store(K + row * hd + d + h * 0, y.to(K.dtype.element_ty), mask=mask & (h == P))
            tl.store(V + row * hd + d + h * 0, y.to(V.dtype.element_ty), mask=mask & (h == P + 1))


@triton.jit
def _incoming(DQ, DK, DV, row, P, hd, h, d, mask):
    """The gradient arriving at one token's q, k and v heads, as one [heads, dims] tile."""
    dy = tl.load(DQ + row * P * hd + h * hd + d, mask=mask & (h < P), other=0.0)
    dy += tl.load(DK + row * hd + d + h * 0, mask=mask & (h == P), other=0.0)
    dy += tl.load(DV + row * hd + d + h * 0, mask=mask & (h == P + 1), other=0.0)
    return dy.to(tl.float32)


@triton.jit
def _bwd(X, W, DQ, DK, DV, RSTD, COS, SIN, DX, DW_PART, n_rows, P, hd, offset, per_position, rot,
         HB: tl.constexpr, GB: tl.constexpr, NORM_V: tl.constexpr, ROWS: tl.constexpr,
         ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.arange(0, GB)[:, None]
    d = tl.arange(0, HB)[None, :]
    G = P + 2
    mask = (h < G) & (d < hd)
    kind = tl.where(h < P, 0, tl.where(h == P, 1, 2))
    w = tl.load(W + kind * hd + d, mask=mask, other=0.0).to(tl.float32) + offset
    normed = (h < P + 1) | NORM_V
    if ROPE:
        partner, sign = _rope_pairs(d, rot, INTERLEAVED)
    dwq = tl.zeros([HB], dtype=tl.float32)
    dwk = tl.zeros([HB], dtype=tl.float32)
    dwv = tl.zeros([HB], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            x = tl.load(X + row * G * hd + h * hd + d, mask=mask, other=0.0).to(tl.float32)
            dy = _incoming(DQ, DK, DV, row, P, hd, h, d, mask)
            if ROPE:  # back through the rotation: dy[d] = dout[d] cos[d] - sign[d] dout[p] sin[p]
                dyp = _incoming(DQ, DK, DV, row, P, hd, h, partner, mask)
                pos = row // per_position
                cs = tl.load(COS + pos * hd + d, mask=d < hd, other=1.0)
                snp = tl.load(SIN + pos * hd + partner, mask=d < hd, other=0.0)
                dy = tl.where(h < P + 1, dy * cs - sign * dyp * snp, dy)
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
    def forward(ctx, mixed, wq, wk, wv, heads_per_group, head_dim, eps, offset, norm_v, rope):
        *lead, groups, width = mixed.shape
        P, hd = heads_per_group, head_dim
        x = mixed.reshape(-1, width).contiguous()
        rows = x.shape[0]
        w = torch.stack([wq.float(), wk.float(), wv.float() if norm_v else wk.float()])
        q = _empty((rows, P * hd), mixed.dtype, mixed.device)
        k = _empty((rows, hd), mixed.dtype, mixed.device)
        v = _empty((rows, hd), mixed.dtype, mixed.device)
        rstd = _empty((rows, P + 2), torch.float32, mixed.device)
        cos, sin, rot, interleaved = rope if rope is not None else (rstd, rstd, 0, False)
        per_position = mixed.shape[1] * groups if rope is not None else 1  # rows: (s, b, group)
        meta = dict(HB=triton.next_power_of_2(hd), GB=triton.next_power_of_2(P + 2),
                    NORM_V=norm_v, ROWS=GROUPS_PER_PROGRAM, ROPE=rope is not None,
                    INTERLEAVED=interleaved)
        _fwd[(_grid(rows),)](x, w, q, k, v, rstd, cos, sin, rows, P, hd, eps, offset, per_position, rot,
                             **meta)
        ctx.save_for_backward(x, w, rstd, cos, sin)
        ctx.meta, ctx.args = meta, (P, hd, offset, norm_v, tuple(lead), groups, per_position, rot)
        ctx.dtypes = (wq.dtype, wk.dtype, wv.dtype)
        return (q.view(*lead, groups * P, hd), k.view(*lead, groups, hd),
                v.view(*lead, groups, hd))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, w, rstd, cos, sin = ctx.saved_tensors
        P, hd, offset, norm_v, lead, groups, per_position, rot = ctx.args
        rows = x.shape[0]
        dx = _empty(x.shape, x.dtype, x.device)
        dw_part = _empty((_grid(rows), 3, hd), torch.float32, x.device)
        _bwd[(_grid(rows),)](
            x, w, dq.reshape(rows, P * hd).contiguous(), dk.reshape(rows, hd).contiguous(),
            dv.reshape(rows, hd).contiguous(), rstd, cos, sin, dx, dw_part, rows, P, hd, offset,
            per_position, rot, **ctx.meta)
        dw = dw_part.sum(0)
        dwq, dwk, dwv = (g.to(t) for g, t in zip(dw, ctx.dtypes))
        return (dx.view(*lead, groups, (P + 2) * hd), dwq, dwk, dwv if norm_v else None,
                None, None, None, None, None, None)


def rope_tables(freqs: torch.Tensor, seq: int, head_dim: int, mscale: float = 1.0):
    """cos and sin ``[seq, head_dim]`` in fp32 from Megatron's rotary ``freqs`` ``[>= seq, 1, 1,
    rot_dim]``: positions from rot_dim on pass through (cos 1, sin 0)."""
    f = freqs[:seq].reshape(seq, -1).float()
    rot = f.shape[-1]
    if rot > head_dim or rot % 2:
        raise ValueError(f"rotary dim {rot} must be even and at most head_dim {head_dim}")
    cos = torch.ones(seq, head_dim, device=f.device)
    sin = torch.zeros(seq, head_dim, device=f.device)
    cos[:, :rot] = torch.cos(f) * mscale
    sin[:, :rot] = torch.sin(f) * mscale
    return cos, sin, rot


def qkv_norm(mixed: torch.Tensor, wq, wk, wv, *, heads_per_group: int, head_dim: int,
             eps: float, zero_centered: bool = False, rope=None, rope_interleaved: bool = False):
    """(q, k, v) from Megatron's grouped QKV output ``[..., groups, (P + 2) * head_dim]``, each
    head RMS-normed with its kind's weight; ``wv=None`` leaves v unnormalized. ``rope``:
    ``rope_tables(...)`` for ``mixed`` of shape ``[seq, batch, groups, width]``: q and k are then
    rotated too (``rope_interleaved``: Megatron's ``rotary_interleaved``)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the fused Q/K/V norm supports head_dim up to {MAX_HEAD_DIM}")
    if rope is not None:
        cos, sin, rot = rope
        if mixed.dim() != 4 or cos.shape != (mixed.shape[0], head_dim):
            raise ValueError("with rope, mixed must be [seq, batch, groups, width] and the "
                             "tables [seq, head_dim]")
        rope = (cos.contiguous(), sin.contiguous(), rot, rope_interleaved)
    norm_v = wv is not None
    return _QKVNorm.apply(mixed, wq, wk, wv if norm_v else wk, heads_per_group, head_dim,
                          eps, 1.0 if zero_centered else 0.0, norm_v, rope)
