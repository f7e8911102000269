"""Compiles every Triton kernel variant for a CUDA target with the real Triton compiler (down to
a cubin with Triton's bundled ptxas): no GPU needed. The interpreter the CPU tests use accepts
code the compiler rejects; this catches that. Run without TRITON_INTERPRET (test_kernels.py does).

    python tests/compile_kernels.py [capability ...]      # default: 90 (H100/H200)
"""

from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def variants():
    """(name, kernel, signature, constexprs) for every constexpr combination the package uses."""
    from megatron_hybridnorm.kernels import qkv_full_norm, qkv_norm, rmsnorm

    bf16, f32, i32 = "*bf16", "*fp32", "i32"
    for add, bias, dropout in itertools.product((False, True), repeat=3):
        if (bias or dropout) and not add:
            continue
        sig = dict(X=bf16, A=bf16, B=bf16, S=bf16, W=f32, Y=bf16, RSTD=f32, SEED="*i64",
                   n_rows=i32, n_cols=i32, eps="fp32", offset="fp32", p="fp32")
        yield (f"rmsnorm._fwd add={add} bias={bias} dropout={dropout}", rmsnorm._fwd, sig,
               dict(ADD=add, BIAS=bias, DROPOUT=dropout, BLOCK=2048, ROWS=16))
    for dropout in (False, True):
        sig = dict(X=bf16, W=f32, DY=bf16, RSTD=f32, DX=bf16, DA=bf16, DW_PART=f32, SEED="*i64",
                   n_rows=i32, n_cols=i32, offset="fp32", p="fp32")
        yield (f"rmsnorm._bwd dropout={dropout}", rmsnorm._bwd, sig,
               dict(DROPOUT=dropout, BLOCK=2048, ROWS=16))
    for norm_v, rope, interleaved in itertools.product((False, True), repeat=3):
        if interleaved and not rope:
            continue
        meta = dict(HB=64, GB=8, NORM_V=norm_v, ROWS=8, ROPE=rope, INTERLEAVED=interleaved)
        common = dict(n_rows=i32, P=i32, hd=i32)
        fwd = dict(X=bf16, W=f32, Q=bf16, K=bf16, V=bf16, RSTD=f32, COS=f32, SIN=f32, **common,
                   eps="fp32", offset="fp32", per_position=i32, rot=i32)
        bwd = dict(X=bf16, W=f32, DQ=bf16, DK=bf16, DV=bf16, RSTD=f32, COS=f32, SIN=f32, DX=bf16,
                   DW_PART=f32, **common, offset="fp32", per_position=i32, rot=i32)
        tag = f"norm_v={norm_v} rope={rope} interleaved={interleaved}"
        yield f"qkv_norm._fwd {tag}", qkv_norm._fwd, fwd, meta
        yield f"qkv_norm._bwd {tag}", qkv_norm._bwd, bwd, meta
    seg = dict(n_rows=i32, groups=i32, row_stride=i32, seg_stride=i32, seg_off=i32, seg_len=i32)
    for phase in (0, 1, 2):
        meta = dict(PHASE=phase, GB=8, SB=256, ROWS=8)
        yield (f"qkv_full_norm._fwd phase={phase}", qkv_full_norm._fwd,
               dict(X=bf16, W=f32, Y=bf16, SS=f32, RSTD=f32, **seg, width=i32, eps="fp32",
                    offset="fp32"), meta)
        yield (f"qkv_full_norm._bwd phase={phase}", qkv_full_norm._bwd,
               dict(X=bf16, W=f32, DY=bf16, RSTD=f32, C=f32, DX=bf16, DW_PART=f32, **seg,
                    width=i32, offset="fp32"), meta)


def main(capabilities) -> int:
    failed = 0
    for cap in capabilities:
        target = GPUTarget("cuda", cap, 32)
        for name, fn, sig, constexprs in variants():
            full = {**sig, **{k: "constexpr" for k in constexprs}}
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=full, constexprs=constexprs),
                                          target=target)
                assert compiled.asm.get("cubin"), "no cubin"
                print(f"ok   sm_{cap} {name}")
            except Exception as e:  # report every failure, then fail
                failed += 1
                print(f"FAIL sm_{cap} {name}: {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main([int(c) for c in sys.argv[1:]] or [90]))
