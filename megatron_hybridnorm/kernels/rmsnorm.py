"""Row-wise RMSNorm in Triton: y = x * rsqrt(mean(x^2) + eps) * (w + offset), fp32 math.

``add_rms_norm`` normalizes a residual sum s = x + dropout(a + bias) in the same pass:
HybridNorm's FFN norm and Post-Norm's norms take Megatron's bias-dropout-add with them, so s is
written once (it is what the backward needs) instead of being written by the add and read back
by the norm. Dropout draws its mask from Triton's Philox generator, seeded by one draw from
torch's current generator (so it follows Megatron's RNG tracker and activation recompute), and
backward regenerates the mask instead of storing it.
Forward saves only the normalized input and rstd (one fp32 per row); backward recomputes x_hat.
The weight gradient is reduced in two fp32 stages: per-program partial sums, then torch.sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16


def _empty(shape, dtype, device):
    """Output allocation (tests poison it to prove every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _kept(SEED, row, n_cols, cols, p):
    """Dropout's keep mask for one row: the same draw in forward and backward."""
    return tl.rand(tl.load(SEED), row * n_cols + cols) >= p


@triton.jit
def _fwd(X, A, B, S, W, Y, RSTD, SEED, n_rows, n_cols, eps, offset, p,
         ADD: tl.constexpr, BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK: tl.constexpr,
         ROWS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    if BIAS:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            x = tl.load(X + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
            if ADD:
                a = tl.load(A + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
                if BIAS:
                    a += b
                if DROPOUT:
                    a = tl.where(_kept(SEED, row, n_cols, cols, p), a / (1.0 - p), 0.0)
                x += a
                s = x.to(S.dtype.element_ty)  # the sum as the unfused add would store it
                tl.store(S + row * n_cols + cols, s, mask=cmask)
                x = s.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            tl.store(RSTD + row, rstd)
            tl.store(Y + row * n_cols + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=cmask)


@triton.jit
def _bwd(X, W, DY, RSTD, DX, DA, DW_PART, SEED, n_rows, n_cols, offset, p,
         DROPOUT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            x = tl.load(X + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            wdy = dy * w
            c = tl.sum(xhat * wdy, axis=0) / n_cols
            dx = (wdy - xhat * c) * rstd
            tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=cmask)
            if DROPOUT:  # the dropped branch's gradient: the same mask, the same scale
                da = tl.where(_kept(SEED, row, n_cols, cols, p), dx / (1.0 - p), 0.0)
                tl.store(DA + row * n_cols + cols, da.to(DA.dtype.element_ty), mask=cmask)
            dw += dy * xhat
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=cmask)


def _launch(rows: int, cols: int):
    return (triton.cdiv(rows, ROWS_PER_PROGRAM),), triton.next_power_of_2(cols)


def _forward(x2, a2, bias, weight, eps, offset, p=0.0, seed=None):
    """Normalized rows (and the residual sum when ``a2`` is given), rstd."""
    rows, cols = x2.shape
    grid, block = _launch(rows, cols)
    add = a2 is not None
    dtype = torch.promote_types(x2.dtype, a2.dtype) if add else x2.dtype
    s = _empty(x2.shape, dtype, x2.device) if add else x2
    y = _empty(x2.shape, dtype, x2.device)
    rstd = _empty((rows,), torch.float32, x2.device)
    _fwd[grid](x2, a2 if add else x2, bias if bias is not None else weight, s, weight, y, rstd,
               seed if seed is not None else rstd, rows, cols, eps, offset, p, ADD=add,
               BIAS=bias is not None, DROPOUT=seed is not None, BLOCK=block,
               ROWS=ROWS_PER_PROGRAM)
    return y, s, rstd


def _backward(s2, weight, dy, rstd, offset, p=0.0, seed=None, a_dtype=None):
    """Gradients of the normalized input (fp32-math, in its dtype), of the dropped branch
    (with ``seed``; else None) and of the weight."""
    rows, cols = s2.shape
    grid, block = _launch(rows, cols)
    dy2 = dy.reshape(rows, cols).contiguous()
    ds = _empty(s2.shape, s2.dtype, s2.device)
    da = _empty(s2.shape, a_dtype, s2.device) if seed is not None else None
    dw_part = _empty((grid[0], cols), torch.float32, s2.device)
    _bwd[grid](s2, weight, dy2, rstd, ds, da if da is not None else ds, dw_part,
               seed if seed is not None else rstd, rows, cols, offset, p,
               DROPOUT=seed is not None, BLOCK=block, ROWS=ROWS_PER_PROGRAM)
    return ds, da, dw_part.sum(0).to(weight.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        x2 = _rows(x)
        y, _, rstd = _forward(x2, None, None, weight, eps, offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw = _backward(x2, weight, dy, rstd, ctx.offset)
        return dx.view(dy.shape), dw, None, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, bias, weight, eps, offset, p, seed):
        y, s, rstd = _forward(_rows(x), _rows(a), bias, weight, eps, offset, p, seed)
        ctx.save_for_backward(s, weight, rstd, seed)
        ctx.offset, ctx.p = offset, p
        ctx.dtypes = (x.dtype, a.dtype, None if bias is None else bias.dtype)
        return y.view(a.shape)

    @staticmethod
    def backward(ctx, dy):
        s, weight, rstd, seed = ctx.saved_tensors
        x_dtype, a_dtype, bias_dtype = ctx.dtypes
        ds, da, dw = _backward(s, weight, dy, rstd, ctx.offset, ctx.p, seed, a_dtype)
        da = ds if da is None else da
        dbias = None if bias_dtype is None else da.float().sum(0).to(bias_dtype)
        return (ds.view(dy.shape).to(x_dtype), da.view(dy.shape).to(a_dtype), dbias, dw,
                None, None, None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False):
    """RMSNorm over the last dim (width up to 64K), output in x's dtype."""
    return _RMSNorm.apply(x, weight, eps, 1.0 if zero_centered else 0.0)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None,
                 weight: torch.Tensor, eps: float, zero_centered: bool = False,
                 dropout_p: float = 0.0):
    """RMSNorm of x + dropout(a + bias) (bias broadcast over rows; dropout as torch's, scaled by
    1 / (1 - p)), output in the promoted dtype of x and a."""
    if x.shape != a.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and a {tuple(a.shape)} differ")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"add_rms_norm: dropout_p={dropout_p} must be in [0, 1)")
    seed = None
    if dropout_p > 0:  # one draw from torch's current generator, kept on the device (no sync)
        seed = torch.randint(0, 2**31 - 1, (1,), device=a.device, dtype=torch.int64)
    return _AddRMSNorm.apply(x, a, bias, weight, eps, 1.0 if zero_centered else 0.0,
                             float(dropout_p), seed)
