"""Fused per-head Q/K/V RMSNorm in Triton, on Megatron's interleaved QKV projection output.

Megatron's ``linear_qkv`` writes, for each KV group, its P = np/ng query heads, then its key
head, then its value head: ``[tokens, groups, (P + 2) * head_dim]``. One pass reads that once,
normalizes every head (fp32) with the weight of its kind (one weight of width head_dim each for
q, k and v, shared by all heads), and writes q ``[tokens, groups * P, head_dim]``, k and v
``[tokens, groups, head_dim]`` contiguously. Backward writes the gradient of the projection
output and reduces the three weight gradients in fp32 (per-program partial sums, then torch).

The grouped output is a matrix of heads, one head_dim row each, whose kind (q, k or v) is the
head's index modulo P + 2. A program normalizes a tile of heads (no padding to a power of 2
per group) and loops over tiles (``launch.py``); in backward it keeps one fp32 accumulator per
kind and reduces each once. The incoming gradients may be strided ([s, b, heads, head_dim] views
of what attention's backward wrote), and are read in place.

With ``rope`` the same pass rotates the normalized q and k (the norms come before RoPE), as
Megatron's ``apply_rotary_pos_emb`` would, in fp32: HybridNorm's attention pre-processing is then
one pass where Pre-Norm's is RoPE alone. Backward rotates the incoming gradient back first.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from megatron_hybridnorm.kernels import MAX_HEAD_DIM
from megatron_hybridnorm.kernels import launch as L


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
def _weights(W, d, hd, offset):
    """The q, k and v weights (stacked, fp32) at positions ``d``."""
    m = d < hd
    wq = tl.load(W + d, mask=m, other=0.0) + offset
    wk = tl.load(W + hd + d, mask=m, other=0.0) + offset
    wv = tl.load(W + 2 * hd + d, mask=m, other=0.0) + offset
    return wq, wk, wv


@triton.jit
def _head_tile(tile, n_heads, P, H: tl.constexpr):
    """A tile of heads ([H, 1] each, int32: the host checks n_heads < 2^31): global head
    index, its group row, its head within the group and its kind (0 q, 1 k, 2 v)."""
    j = tile * H + tl.arange(0, H)[:, None]
    G = P + 2
    row = j // G
    h = j - row * G
    kind = tl.where(h < P, 0, tl.where(h == P, 1, 2))
    return j, row, h, kind


@triton.jit
def _fwd(X, W, Q, K, V, RSTD, COS, SIN, n_heads, P, hd, eps, offset, per_position, rot,
         HB: tl.constexpr, H: tl.constexpr, NORM_V: tl.constexpr, ROPE: tl.constexpr,
         INTERLEAVED: tl.constexpr):
    d = tl.arange(0, HB)[None, :]
    wq, wk, wv = _weights(W, d, hd, offset)
    if ROPE:
        partner, sign = _rope_pairs(d, rot, INTERLEAVED)
        wqp, wkp, _ = _weights(W, partner, hd, offset)
    for tile in range(tl.program_id(0), tl.cdiv(n_heads, H), tl.num_programs(0)):
        j, row, h, kind = _head_tile(tile, n_heads, P, H)
        mask = (j < n_heads) & (d < hd)
        src = X + j.to(tl.int64) * hd
        x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1, keep_dims=True) / hd + eps)   # [H, 1]
        tl.store(RSTD + j, rstd, mask=j < n_heads)
        w = tl.where(kind == 0, wq, tl.where(kind == 1, wk, wv))
        y = tl.where((kind < 2) | NORM_V, x * rstd * w, x)
        if ROPE:  # q and k; the partner's normalized value is recomputed from its input
            xp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
            trig = (row // per_position).to(tl.int64) * hd + d
            cs = tl.load(COS + trig, mask=mask, other=1.0)
            sn = tl.load(SIN + trig, mask=mask, other=0.0)
            y = tl.where(kind < 2, y * cs + sign * (xp * rstd * tl.where(kind == 0, wqp, wkp)) * sn,
                         y)
        row64 = row.to(tl.int64)
        dst = tl.where(kind == 0, Q + (row64 * P + h) * hd,
                       tl.where(kind == 1, K + row64 * hd, V + row64 * hd))
        tl.store(dst + d, y.to(Q.dtype.element_ty), mask=mask)


@triton.jit
def _incoming(DQ, DK, DV, row, h, kind, groups, batch, P, qs, qb, qh, ks, kb, kh, vs, vb, vh):
    """Where each head's incoming gradient starts ([H, 1] pointers), in the strided
    [s, b, heads, head_dim] gradients of q, k and v."""
    g = row % groups
    tok = row // groups
    s = (tok // batch).to(tl.int64)
    b = (tok % batch).to(tl.int64)
    return tl.where(kind == 0, DQ + s * qs + b * qb + (g * P + h).to(tl.int64) * qh,
                    tl.where(kind == 1, DK + s * ks + b * kb + g.to(tl.int64) * kh,
                             DV + s * vs + b * vb + g.to(tl.int64) * vh))


@triton.jit
def _bwd(X, W, DQ, DK, DV, RSTD, COS, SIN, DX, DW_PART, n_heads, P, hd, offset, per_position,
         rot, groups, batch, qs, qb, qh, ks, kb, kh, vs, vb, vh,
         HB: tl.constexpr, H: tl.constexpr, NORM_V: tl.constexpr, ROPE: tl.constexpr,
         INTERLEAVED: tl.constexpr):
    pid = tl.program_id(0)
    d = tl.arange(0, HB)[None, :]
    wq, wk, wv = _weights(W, d, hd, offset)
    if ROPE:
        partner, sign = _rope_pairs(d, rot, INTERLEAVED)
    acc_q = tl.zeros([H, HB], dtype=tl.float32)
    acc_k = tl.zeros([H, HB], dtype=tl.float32)
    acc_v = tl.zeros([H, HB], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_heads, H), tl.num_programs(0)):
        j, row, h, kind = _head_tile(tile, n_heads, P, H)
        mask = (j < n_heads) & (d < hd)
        grad = _incoming(DQ, DK, DV, row, h, kind, groups, batch, P, qs, qb, qh, ks, kb, kh,
                         vs, vb, vh)
        dy = tl.load(grad + d, mask=mask, other=0.0).to(tl.float32)
        if ROPE:  # back through the rotation: dy[d] = dout[d] cos[d] - sign[d] dout[p] sin[p]
            dyp = tl.load(grad + partner, mask=mask, other=0.0).to(tl.float32)
            trig = (row // per_position).to(tl.int64) * hd
            cs = tl.load(COS + trig + d, mask=mask, other=1.0)
            snp = tl.load(SIN + trig + partner, mask=mask, other=0.0)
            dy = tl.where(kind < 2, dy * cs - sign * dyp * snp, dy)
        src = j.to(tl.int64) * hd + d
        x = tl.load(X + src, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + j, mask=j < n_heads, other=0.0)
        xhat = x * rstd
        wdy = dy * tl.where(kind == 0, wq, tl.where(kind == 1, wk, wv))
        c = tl.sum(xhat * wdy, axis=1, keep_dims=True) / hd
        dx = tl.where((kind < 2) | NORM_V, (wdy - xhat * c) * rstd, dy)
        tl.store(DX + src, dx.to(DX.dtype.element_ty), mask=mask)
        contrib = dy * xhat
        acc_q += tl.where(kind == 0, contrib, 0.0)
        acc_k += tl.where(kind == 1, contrib, 0.0)
        if NORM_V:
            acc_v += tl.where(kind == 2, contrib, 0.0)
    dcols = tl.arange(0, HB)
    base = DW_PART + pid * 3 * hd
    tl.store(base + dcols, tl.sum(acc_q, axis=0), mask=dcols < hd)
    tl.store(base + hd + dcols, tl.sum(acc_k, axis=0), mask=dcols < hd)
    tl.store(base + 2 * hd + dcols, tl.sum(acc_v, axis=0), mask=dcols < hd)


def _launch(kernel: str, n_heads: int, hd: int, device):
    cfg = L.launch(kernel, hd)
    return cfg, L.grid(triton.cdiv(n_heads, cfg.rows), device, cfg)


class _QKVNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixed, wq, wk, wv, heads_per_group, head_dim, eps, offset, norm_v, rope):
        *lead, groups, width = mixed.shape
        P, hd = heads_per_group, head_dim
        x = mixed.reshape(-1, width).contiguous()
        rows = x.shape[0]
        n_heads = rows * (P + 2)
        w = torch.stack([wq.float(), wk.float(), wv.float() if norm_v else wk.float()])
        q = L.empty((rows, P * hd), mixed.dtype, mixed.device)
        k = L.empty((rows, hd), mixed.dtype, mixed.device)
        v = L.empty((rows, hd), mixed.dtype, mixed.device)
        rstd = L.empty((n_heads,), torch.float32, mixed.device)
        cos, sin, rot, interleaved = rope if rope is not None else (rstd, rstd, 0, False)
        per_position = mixed.shape[1] * groups if rope is not None else 1  # rows: (s, b, group)
        meta = dict(HB=triton.next_power_of_2(hd), NORM_V=norm_v, ROPE=rope is not None,
                    INTERLEAVED=interleaved)
        if n_heads >= 2**31:
            raise ValueError(f"the fused Q/K/V norm indexes heads in 32 bits: {n_heads} heads")
        cfg, n = _launch("qkv_fwd", n_heads, hd, mixed.device)
        with L.on_device(mixed):
            _fwd[(n,)](x, w, q, k, v, rstd, cos, sin, n_heads, P, hd, eps, offset, per_position,
                       rot, H=cfg.rows, num_warps=cfg.warps, **meta)
        ctx.save_for_backward(x, w, rstd, cos, sin)
        seq, batch = L.seq_batch(tuple(lead), rows // groups)
        ctx.meta = meta
        ctx.args = (P, hd, offset, norm_v, tuple(lead), groups, per_position, rot, seq, batch)
        ctx.dtypes = (wq.dtype, wk.dtype, wv.dtype)
        return (q.view(*lead, groups * P, hd), k.view(*lead, groups, hd),
                v.view(*lead, groups, hd))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, w, rstd, cos, sin = ctx.saved_tensors
        P, hd, offset, norm_v, lead, groups, per_position, rot, seq, batch = ctx.args
        n_heads = x.shape[0] * (P + 2)
        dq, dk, dv = (L.heads_view(t, seq, batch, heads, hd)
                      for t, heads in ((dq, groups * P), (dk, groups), (dv, groups)))
        strides = [s for t in (dq, dk, dv) for s in (t.stride(0), t.stride(1), t.stride(2))]
        dx = L.empty(x.shape, x.dtype, x.device)
        cfg, n = _launch("qkv_bwd", n_heads, hd, x.device)
        dw_part = L.empty((n, 3, hd), torch.float32, x.device)
        with L.on_device(x):
            _bwd[(n,)](x, w, dq, dk, dv, rstd, cos, sin, dx, dw_part, n_heads, P, hd, offset,
                       per_position, rot, groups, batch, *strides, H=cfg.rows,
                       num_warps=cfg.warps, **ctx.meta)
        dw = dw_part.sum(0)
        dwq, dwk, dwv = (g.to(t) for g, t in zip(dw, ctx.dtypes))
        return (dx.view(*lead, groups, (P + 2) * hd), dwq, dwk, dwv if norm_v else None,
                None, None, None, None, None, None)


_rope_cache: dict = {}


def rope_tables(freqs: torch.Tensor, seq: int, head_dim: int, mscale: float = 1.0):
    """cos and sin ``[seq, head_dim]`` in fp32 from Megatron's rotary ``freqs`` ``[>= seq, 1, 1,
    rot_dim]``: positions from rot_dim on pass through (cos 1, sin 0).

    Every layer of a step gets the same ``freqs`` tensor (Megatron computes it once per forward,
    and caches it across steps): the tables of the last one asked for are kept and reused while
    that tensor is alive and unchanged."""
    key = (freqs.data_ptr(), freqs._version, tuple(freqs.shape), freqs.device, seq, head_dim,
           float(mscale))
    hit = _rope_cache.get("last")
    if hit is not None and hit[0] == key and hit[1]() is freqs:
        return hit[2]
    tables = _rope_tables(freqs, seq, head_dim, mscale)
    _rope_cache["last"] = (key, weakref.ref(freqs), tables)
    return tables


def _rope_tables(freqs, seq, head_dim, mscale):
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
