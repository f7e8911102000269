"""Q/K/V RMSNorm over the full projected width (``qkv_norm="full"``, OLMo 2's), in Triton.

In Megatron's grouped QKV layout ``[tokens, groups, (P + 2) * head_dim]`` the query of one token
is ``groups`` segments of ``P * head_dim`` values, one per KV group, and its key and value are
``groups`` segments of ``head_dim``. One launch per kind reads only that kind's segments, takes
the row's statistics over all of them and writes the output contiguously (q ``[tokens, groups *
P, head_dim]``, k and v ``[tokens, groups, head_dim]``); backward writes those segments of the
projection's gradient. Under tensor parallelism a rank holds a slice of the heads: the per-row
sum of squares (forward) and sum of x_hat * w * dy (backward) are all-reduced over the group
between a statistics pass and the normalizing pass, so the result equals one rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_hybridnorm.kernels import launch as L

SINGLE, STATS, APPLY = 0, 1, 2  # phases: all in one pass; statistics only; with given statistics


@triton.jit
def _segment_tile(W, groups, seg_len, offset, GB: tl.constexpr, SB: tl.constexpr):
    """Group and position indices of a row's segments ([1, GB, SB]), their mask, and the
    weight (fp32)."""
    g = tl.arange(0, GB)[None, :, None]
    c = tl.arange(0, SB)[None, None, :]
    mask = (g < groups) & (c < seg_len)
    w = tl.load(W + g * seg_len + c, mask=mask, other=0.0).to(tl.float32) + offset
    return g, c, mask, w


@triton.jit
def _row_statistic(local, STAT, row, rmask, PHASE: tl.constexpr):
    """The sum of ``local`` over each row of the tile ([ROWS, 1, 1]): this rank's (SINGLE;
    STATS also stores it for the all-reduce) or the all-reduced one stored in STAT (APPLY)."""
    if PHASE == 2:
        total = tl.load(STAT + row, mask=rmask, other=0.0)
    else:
        total = tl.sum(tl.sum(local, axis=2, keep_dims=True), axis=1, keep_dims=True)
        if PHASE == 1:
            tl.store(STAT + row, total, mask=rmask)
    return total


@triton.jit
def _fwd(X, W, Y, SS, RSTD, n_rows, groups, row_stride, seg_stride, seg_off, seg_len, width, eps,
         offset, PHASE: tl.constexpr, GB: tl.constexpr, SB: tl.constexpr, ROWS: tl.constexpr):
    g, c, segmask, w = _segment_tile(W, groups, seg_len, offset, GB, SB)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        row = (tile * ROWS + tl.arange(0, ROWS)[:, None, None]).to(tl.int64)
        rmask = row < n_rows
        mask = rmask & segmask
        x = tl.load(X + row * row_stride + g * seg_stride + seg_off + c, mask=mask,
                    other=0.0).to(tl.float32)
        ss = _row_statistic(x * x, SS, row, rmask, PHASE)
        if PHASE != 1:
            rstd = 1.0 / tl.sqrt(ss / width + eps)
            tl.store(RSTD + row, rstd, mask=rmask)
            tl.store(Y + row * groups * seg_len + g * seg_len + c,
                     (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(X, W, DY, RSTD, C, DX, DW_PART, n_rows, groups, row_stride, seg_stride, seg_off,
         seg_len, width, offset, dy_s, dy_b, dy_h, batch, hd, PHASE: tl.constexpr,
         GB: tl.constexpr, SB: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    g, c, segmask, w = _segment_tile(W, groups, seg_len, offset, GB, SB)
    dw = tl.zeros([1, GB, SB], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        row = (tile * ROWS + tl.arange(0, ROWS)[:, None, None]).to(tl.int64)
        rmask = row < n_rows
        mask = rmask & segmask
        x = tl.load(X + row * row_stride + g * seg_stride + seg_off + c, mask=mask,
                    other=0.0).to(tl.float32)
        # dy: a [s, b, heads, head_dim] view; segment g holds heads g * (seg_len / hd) on
        dy = tl.load(DY + (row // batch) * dy_s + (row % batch) * dy_b
                     + (g * (seg_len // hd) + c // hd) * dy_h + c % hd, mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=rmask, other=0.0)
        xhat = x * rstd
        wdy = w * dy
        total = _row_statistic(xhat * wdy, C, row, rmask, PHASE)
        if PHASE != 1:
            dx = (wdy - xhat * (total / width)) * rstd
            tl.store(DX + row * row_stride + g * seg_stride + seg_off + c,
                     dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0, keep_dims=True)
    if PHASE != 1:
        tl.store(DW_PART + pid * groups * seg_len + g * seg_len + c, dw, mask=segmask)


def _launch(kernel, x, groups, seg_stride, seg_off, seg_len):
    rows = x.shape[0]
    GB, SB = triton.next_power_of_2(groups), triton.next_power_of_2(seg_len)
    cfg = L.launch(kernel, GB * SB)
    n = L.grid(triton.cdiv(rows, cfg.rows), x.device, cfg)
    meta = dict(GB=GB, SB=SB, ROWS=cfg.rows, num_warps=cfg.warps)
    return n, (rows, groups, x.shape[1], seg_stride, seg_off, seg_len), meta


def _all_reduce(t, group):
    torch.distributed.all_reduce(t, group=group)
    return t


def _norm_segments(x, w, seg, eps, offset, group, dtype):
    """Forward of one kind: its normalized output and rstd."""
    groups, seg_stride, seg_off, seg_len, width = seg
    n, args, meta = _launch("full_fwd", x, groups, seg_stride, seg_off, seg_len)
    rows = x.shape[0]
    y = L.empty((rows, groups * seg_len), dtype, x.device)
    rstd = L.empty((rows,), torch.float32, x.device)
    ss = None
    with L.on_device(x):
        if group is not None:
            ss = L.empty((rows,), torch.float32, x.device)
            _fwd[(n,)](x, w, y, ss, rstd, *args, width, eps, offset, PHASE=STATS, **meta)
            _all_reduce(ss, group)
        _fwd[(n,)](x, w, y, ss if ss is not None else rstd, rstd, *args, width, eps, offset,
                   PHASE=SINGLE if group is None else APPLY, **meta)
    return y, rstd


def _norm_segments_backward(x, w, dy, rstd, dx, seg, offset, group, hd):
    """Writes this kind's segments of dx; returns the weight gradient (fp32). ``dy``: a
    [s, b, heads, head_dim] view (``launch.heads_view``)."""
    groups, seg_stride, seg_off, seg_len, width = seg
    n, args, meta = _launch("full_bwd", x, groups, seg_stride, seg_off, seg_len)
    args = (*args, width, offset, dy.stride(0), dy.stride(1), dy.stride(2), dy.shape[1], hd)
    dw_part = L.empty((n, groups * seg_len), torch.float32, x.device)
    total = None
    with L.on_device(x):
        if group is not None:
            total = L.empty((x.shape[0],), torch.float32, x.device)
            _bwd[(n,)](x, w, dy, rstd, total, dx, dw_part, *args, PHASE=STATS, **meta)
            _all_reduce(total, group)
        _bwd[(n,)](x, w, dy, rstd, total if total is not None else rstd, dx, dw_part, *args,
                   PHASE=SINGLE if group is None else APPLY, **meta)
    return dw_part.sum(0)


class _FullQKVNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixed, wq, wk, wv, P, hd, widths, eps, offset, group):
        *lead, groups, width = mixed.shape
        x = mixed.reshape(-1, groups * width).contiguous()
        segs = [(groups, width, 0, P * hd, widths[0]), (groups, width, P * hd, hd, widths[1]),
                (groups, width, (P + 1) * hd, hd, widths[1])]
        outs, rstds = [], []
        for w, seg in zip((wq, wk, wv), segs):
            if w is None:  # v without a norm: its segments as they are
                y = x.view(-1, groups, P + 2, hd)[:, :, P + 1].reshape(-1, groups * hd)
                outs.append(y.contiguous())
                continue
            y, rstd = _norm_segments(x, w, seg, eps, offset, group, mixed.dtype)
            outs.append(y)
            rstds.append(rstd)
        ctx.save_for_backward(x, wq, wk, wv, *rstds)
        ctx.args = (segs, offset, group, tuple(lead), groups, P, hd, wv is not None,
                    L.seq_batch(tuple(lead), x.shape[0]))
        q, k, v = outs
        return (q.view(*lead, groups * P, hd), k.view(*lead, groups, hd),
                v.view(*lead, groups, hd))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, wq, wk, wv, *rstds = ctx.saved_tensors
        segs, offset, group, lead, groups, P, hd, norm_v, (seq, batch) = ctx.args
        dx = L.empty(x.shape, x.dtype, x.device)
        dws = []
        for w, dy, seg, rstd, heads in zip((wq, wk, wv) if norm_v else (wq, wk), (dq, dk, dv),
                                           segs, rstds, (groups * P, groups, groups)):
            dy = L.heads_view(dy, seq, batch, heads, hd)
            dws.append(_norm_segments_backward(x, w, dy, rstd, dx, seg, offset, group, hd)
                       .to(w.dtype))
        if not norm_v:
            dx.view(-1, groups, P + 2, hd)[:, :, P + 1] = dv.reshape(-1, groups, hd)
            dws.append(None)
        return (dx.view(*lead, groups, (P + 2) * hd), *dws, None, None, None, None, None, None)


def qkv_full_norm(mixed: torch.Tensor, wq, wk, wv, *, heads_per_group: int, head_dim: int,
                  widths: tuple[int, int], eps: float, zero_centered: bool = False, group=None):
    """(q, k, v) from Megatron's grouped QKV output ``[..., groups, (P + 2) * head_dim]``, q
    normalized over all its heads with ``wq`` (width groups * P * head_dim), k and v over all KV
    heads; ``widths``: the full (all-rank) widths of q and of k/v; ``group``: the tensor-parallel
    group whose ranks hold the other heads (None on one rank); ``wv=None`` leaves v as it is."""
    return _FullQKVNorm.apply(mixed, wq, wk, wv, heads_per_group, head_dim, tuple(widths), eps,
                              1.0 if zero_centered else 0.0, group)
