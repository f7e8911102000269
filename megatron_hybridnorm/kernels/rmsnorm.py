"""Row-wise RMSNorm in Triton: y = x * rsqrt(mean(x^2) + eps) * (w + offset), fp32 math.

``add_rms_norm`` normalizes a residual sum s = x + dropout(a + bias) in the same pass:
HybridNorm's FFN norm and Post-Norm's norms take Megatron's bias-dropout-add with them, so s is
written once (it is what the backward needs) instead of being written by the add and read back
by the norm. Dropout draws its mask from Triton's Philox generator (four draws per counter),
seeded by one 63-bit draw from torch's current generator (so it follows Megatron's RNG tracker
and activation recompute); backward regenerates the mask instead of storing it.
Forward saves only the normalized input and rstd (one fp32 per row); backward recomputes x_hat.
The weight and bias gradients are reduced in two fp32 stages: one partial row per program, then
torch.sum over the (few, persistent) programs.

A program normalizes a tile of ``rows`` rows at once and loops over tiles (``launch.py``). Rows
up to ``MAX_BLOCK`` wide stay in registers; wider rows are read in chunks, twice. Offsets are
64-bit; inputs may have any row stride (contiguous rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_hybridnorm.kernels import launch as L


@triton.jit
def _keep(SEED, rows, c0, n_cols, p, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Dropout's keep mask for ``rows`` x columns [c0, c0 + BLOCK): element (row, col) takes lane
    col % 4 of Philox's four uniform draws at counter row * ceil(n_cols / 4) + col // 4."""
    quad = c0 // 4 + tl.arange(0, BLOCK // 4)[None, :]
    u0, u1, u2, u3 = tl.rand4x(tl.load(SEED), rows * ((n_cols + 3) // 4) + quad)
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # [ROWS, BLOCK // 4, 2, 2]: lanes 0, 1, 2, 3
    return tl.reshape(u, (ROWS, BLOCK)) >= p


@triton.jit
def _residual_sum(X, A, S, SEED, b, rows, cols, c0, mask, n_cols, x_stride, a_stride, p,
                  ADD: tl.constexpr, BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """x, or with ADD s = x + dropout(a + b), stored in S's dtype and returned as stored (fp32)."""
    x = tl.load(X + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        a = tl.load(A + rows * a_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if BIAS:
            a += b
        if DROPOUT:
            a = tl.where(_keep(SEED, rows, c0, n_cols, p, ROWS, BLOCK), a / (1.0 - p), 0.0)
        s = (x + a).to(S.dtype.element_ty)  # the sum as the unfused add would store it
        tl.store(S + rows * n_cols + cols, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _fwd(X, A, B, S, W, Y, RSTD, SEED, n_rows, n_cols, x_stride, a_stride, eps, offset, p,
         ADD: tl.constexpr, BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK: tl.constexpr,
         ROWS: tl.constexpr, CHUNKED: tl.constexpr):
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    b = 0.0
    if not CHUNKED:
        w = tl.load(W + c, mask=c < n_cols, other=0.0).to(tl.float32) + offset
        if BIAS:
            b = tl.load(B + c, mask=c < n_cols, other=0.0).to(tl.float32)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = (tile * ROWS + r).to(tl.int64)
        rmask = rows < n_rows
        if CHUNKED:
            ss = tl.zeros([ROWS, 1], dtype=tl.float32)
            for c0 in range(0, n_cols, BLOCK):
                cols = c0 + c
                bc = b
                if BIAS:
                    bc = tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                x = _residual_sum(X, A, S, SEED, bc, rows, cols, c0, rmask & (cols < n_cols),
                                  n_cols, x_stride, a_stride, p, ADD, BIAS, DROPOUT, ROWS, BLOCK)
                ss += tl.sum(x * x, axis=1, keep_dims=True)
            rstd = 1.0 / tl.sqrt(ss / n_cols + eps)
            tl.store(RSTD + rows, rstd, mask=rmask)
            tl.debug_barrier()  # the sum written above is read back below
            for c0 in range(0, n_cols, BLOCK):
                cols = c0 + c
                mask = rmask & (cols < n_cols)
                if ADD:
                    x = tl.load(S + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    x = tl.load(X + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
                wc = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
                tl.store(Y + rows * n_cols + cols, (x * rstd * wc).to(Y.dtype.element_ty),
                         mask=mask)
        else:
            mask = rmask & (c < n_cols)
            x = _residual_sum(X, A, S, SEED, b, rows, c, 0, mask, n_cols, x_stride, a_stride, p,
                              ADD, BIAS, DROPOUT, ROWS, BLOCK)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1, keep_dims=True) / n_cols + eps)
            tl.store(RSTD + rows, rstd, mask=rmask)
            tl.store(Y + rows * n_cols + c, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _load(S, W, DY, rows, cols, mask, n_cols, dy_stride, offset):
    """The saved sum, the incoming gradient and the weight at these columns (fp32)."""
    x = tl.load(S + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    return x, dy, w


@triton.jit
def _grads(x, dy, w, DS, DA, SEED, rows, cols, c0, mask, rstd, cbar, n_cols, p,
           DROPOUT: tl.constexpr, WRITE_DA: tl.constexpr, ROWS: tl.constexpr,
           BLOCK: tl.constexpr):
    """Writes d(sum) (and the dropped branch's gradient); returns (dy * x_hat, that gradient)."""
    xhat = x * rstd
    ds = (dy * w - xhat * cbar) * rstd
    tl.store(DS + rows * n_cols + cols, ds.to(DS.dtype.element_ty), mask=mask)
    da = ds
    if DROPOUT:  # the same mask, the same scale
        da = tl.where(_keep(SEED, rows, c0, n_cols, p, ROWS, BLOCK), ds / (1.0 - p), 0.0)
    if WRITE_DA:
        tl.store(DA + rows * n_cols + cols, da.to(DA.dtype.element_ty), mask=mask)
    return dy * xhat, da


@triton.jit
def _bwd(S, W, DY, RSTD, DS, DA, DW_PART, DB_PART, SEED, n_rows, n_cols, dy_stride, offset, p,
         DROPOUT: tl.constexpr, WRITE_DA: tl.constexpr, BIAS_GRAD: tl.constexpr,
         BLOCK: tl.constexpr, ROWS: tl.constexpr, CHUNKED: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    dw = tl.zeros([1, BLOCK], dtype=tl.float32)
    db = tl.zeros([1, BLOCK], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = (tile * ROWS + r).to(tl.int64)
        rmask = rows < n_rows
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        if CHUNKED:
            dot = tl.zeros([ROWS, 1], dtype=tl.float32)
            for c0 in range(0, n_cols, BLOCK):
                cols = c0 + c
                x, dy, w = _load(S, W, DY, rows, cols, rmask & (cols < n_cols), n_cols,
                                 dy_stride, offset)
                dot += tl.sum(x * rstd * w * dy, axis=1, keep_dims=True)
            for c0 in range(0, n_cols, BLOCK):
                cols = c0 + c
                mask = rmask & (cols < n_cols)
                x, dy, w = _load(S, W, DY, rows, cols, mask, n_cols, dy_stride, offset)
                dwc, da = _grads(x, dy, w, DS, DA, SEED, rows, cols, c0, mask, rstd,
                                 dot / n_cols, n_cols, p, DROPOUT, WRITE_DA, ROWS, BLOCK)
                # this program's partial sums of the chunk: read, add, write (zeroed by the host)
                tl.debug_barrier()
                part = DW_PART + pid * n_cols + cols
                tl.store(part, tl.load(part, mask=cols < n_cols) +
                         tl.sum(dwc, axis=0, keep_dims=True), mask=cols < n_cols)
                if BIAS_GRAD:
                    part = DB_PART + pid * n_cols + cols
                    tl.store(part, tl.load(part, mask=cols < n_cols) +
                             tl.sum(da, axis=0, keep_dims=True), mask=cols < n_cols)
        else:
            mask = rmask & (c < n_cols)
            x, dy, w = _load(S, W, DY, rows, c, mask, n_cols, dy_stride, offset)
            dot = tl.sum(x * rstd * w * dy, axis=1, keep_dims=True)
            dwc, da = _grads(x, dy, w, DS, DA, SEED, rows, c, 0, mask, rstd, dot / n_cols,
                             n_cols, p, DROPOUT, WRITE_DA, ROWS, BLOCK)
            dw += tl.sum(dwc, axis=0, keep_dims=True)
            if BIAS_GRAD:
                db += tl.sum(da, axis=0, keep_dims=True)
    if not CHUNKED:
        tl.store(DW_PART + pid * n_cols + c, dw, mask=c < n_cols)
        if BIAS_GRAD:
            tl.store(DB_PART + pid * n_cols + c, db, mask=c < n_cols)


def _as_rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t`` as [rows, cols] with contiguous rows: a view with its row stride where one exists."""
    t2 = t.reshape(-1, cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(x2, a2, bias, weight, eps, offset, p=0.0, seed=None):
    """Normalized rows (and the residual sum when ``a2`` is given), rstd."""
    rows, cols = x2.shape
    add = a2 is not None
    dtype = torch.promote_types(x2.dtype, a2.dtype) if add else x2.dtype
    s = L.empty((rows, cols), dtype, x2.device) if add else x2
    y = L.empty((rows, cols), dtype, x2.device)
    rstd = L.empty((rows,), torch.float32, x2.device)
    block = L.block_width(cols)
    cfg = L.launch("rms_fwd", cols)
    n = L.grid(triton.cdiv(rows, cfg.rows), x2.device, cfg)
    with L.on_device(x2):
        _fwd[(n,)](x2, a2 if add else x2, bias if bias is not None else weight, s, weight, y, rstd,
                   seed if seed is not None else rstd, rows, cols, x2.stride(0),
                   a2.stride(0) if add else 0, eps, offset, p, ADD=add, BIAS=bias is not None,
                   DROPOUT=seed is not None, BLOCK=block, ROWS=cfg.rows, CHUNKED=cols > block,
                   num_warps=cfg.warps)
    return y, s, rstd


def _backward(s2, weight, dy, rstd, offset, p=0.0, seed=None, a_dtype=None, bias_grad=False):
    """Gradients of the normalized input (fp32 math, in its dtype), of the dropped branch (in
    ``a_dtype``; None when it is the same tensor), of the weight and of the bias (or None)."""
    rows, cols = s2.shape
    dy2 = _as_rows(dy, cols)
    ds = L.empty((rows, cols), s2.dtype, s2.device)
    write_da = seed is not None or (a_dtype is not None and a_dtype != s2.dtype)
    da = L.empty((rows, cols), a_dtype, s2.device) if write_da else None
    block = L.block_width(cols)
    chunked = cols > block
    cfg = L.launch("rms_bwd", cols)
    n = L.grid(triton.cdiv(rows, cfg.rows), s2.device, cfg)
    parts = torch.zeros if chunked else L.empty  # chunks add into the partial sums
    dw_part = parts((n, cols), dtype=torch.float32, device=s2.device)
    db_part = parts((n, cols), dtype=torch.float32, device=s2.device) if bias_grad else None
    with L.on_device(s2):
        _bwd[(n,)](s2, weight, dy2, rstd, ds, da if write_da else ds, dw_part,
                   db_part if bias_grad else dw_part, seed if seed is not None else rstd, rows,
                   cols, dy2.stride(0), offset, p, DROPOUT=seed is not None, WRITE_DA=write_da,
                   BIAS_GRAD=bias_grad, BLOCK=block, ROWS=cfg.rows, CHUNKED=chunked,
                   num_warps=cfg.warps)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0) if bias_grad else None
    return ds, da, dw, db


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        x2 = _as_rows(x, x.shape[-1])
        y, _, rstd = _forward(x2, None, None, weight, eps, offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw, _ = _backward(x2, weight, dy, rstd, ctx.offset)
        return dx.view(dy.shape), dw, None, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, bias, weight, eps, offset, p, seed):
        cols = x.shape[-1]
        y, s, rstd = _forward(_as_rows(x, cols), _as_rows(a, cols), bias, weight, eps, offset, p,
                              seed)
        ctx.save_for_backward(s, weight, rstd, seed)
        ctx.offset, ctx.p = offset, p
        ctx.dtypes = (x.dtype, a.dtype, None if bias is None else bias.dtype)
        return y.view(a.shape)

    @staticmethod
    def backward(ctx, dy):
        s, weight, rstd, seed = ctx.saved_tensors
        x_dtype, a_dtype, bias_dtype = ctx.dtypes
        ds, da, dw, db = _backward(s, weight, dy, rstd, ctx.offset, ctx.p, seed, a_dtype,
                                   bias_grad=bias_dtype is not None)
        da = ds if da is None else da
        dbias = None if db is None else db.to(bias_dtype)
        return (ds.view(dy.shape).to(x_dtype), da.view(dy.shape), dbias, dw,
                None, None, None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False):
    """RMSNorm over the last dim, output in x's dtype."""
    return _RMSNorm.apply(x, weight, eps, 1.0 if zero_centered else 0.0)


def draw_seed(device) -> torch.Tensor:
    """One 63-bit draw from torch's current generator, kept on the device (no sync)."""
    return torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None,
                 weight: torch.Tensor, eps: float, zero_centered: bool = False,
                 dropout_p: float = 0.0):
    """RMSNorm of x + dropout(a + bias) (bias broadcast over rows; dropout as torch's, scaled by
    1 / (1 - p)), output in the promoted dtype of x and a."""
    if x.shape != a.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and a {tuple(a.shape)} differ")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"add_rms_norm: dropout_p={dropout_p} must be in [0, 1)")
    seed = draw_seed(a.device) if dropout_p > 0 else None
    return _AddRMSNorm.apply(x, a, bias, weight, eps, 1.0 if zero_centered else 0.0,
                             float(dropout_p), seed)
