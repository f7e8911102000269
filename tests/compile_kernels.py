"""Compiles every Triton kernel variant for a CUDA target with the real Triton compiler, down to
a cubin with Triton's bundled ptxas: no GPU needed. The interpreter the CPU tests use accepts
code the compiler rejects; this catches that. Every constexpr variant is built with its default
launch config at the widths that matter (the paper's 1.2B shapes, the widest single-pass row and
a chunked one), and every candidate launch config of ``launch.py`` at the paper's widths.
``ptxas -v`` reports each build's registers per thread and spilled bytes; ``--json`` writes them.
Run without TRITON_INTERPRET (test_kernels.py does).

    python tests/compile_kernels.py [--json FILE] [capability ...]     # default: 90 (H100/H200)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

RMS_WIDTHS = (2048, 8192, 16384)  # the 1.2B hidden size, the widest single pass, chunked
HEAD_DIMS = (64, 128)
FULL = ((8, 4 * 64), (8, 64))  # (groups, segment): the 1.2B q and k/v rows (32 / 8 heads, hd 64)
bf16, f32, i32 = "*bf16", "*fp32", "i32"


def _rms(launch, rmsnorm, width, cfg, flags):
    block = launch.block_width(width)
    if flags[0] == "fwd":
        _, add, bias, dropout = flags
        sig = dict(X=bf16, A=bf16, B=bf16, S=bf16, W=f32, Y=bf16, RSTD=f32, SEED="*i64",
                   n_rows=i32, n_cols=i32, x_stride=i32, a_stride=i32, eps="fp32",
                   offset="fp32", p="fp32")
        return rmsnorm._fwd, sig, dict(ADD=add, BIAS=bias, DROPOUT=dropout, BLOCK=block,
                                       ROWS=cfg.rows, CHUNKED=width > block)
    _, dropout, write_da, bias_grad = flags
    sig = dict(S=bf16, W=f32, DY=bf16, RSTD=f32, DS=bf16, DA=bf16, DW_PART=f32, DB_PART=f32,
               SEED="*i64", n_rows=i32, n_cols=i32, dy_stride=i32, offset="fp32", p="fp32")
    return rmsnorm._bwd, sig, dict(DROPOUT=dropout, WRITE_DA=write_da, BIAS_GRAD=bias_grad,
                                   BLOCK=block, ROWS=cfg.rows, CHUNKED=width > block)


def _qkv(qkv_norm, hd, cfg, flags):
    direction, norm_v, rope, interleaved = flags
    meta = dict(HB=triton.next_power_of_2(hd), H=cfg.rows, NORM_V=norm_v, ROPE=rope,
                INTERLEAVED=interleaved)
    common = dict(n_heads=i32, P=i32, hd=i32)
    if direction == "fwd":
        sig = dict(X=bf16, W=f32, Q=bf16, K=bf16, V=bf16, RSTD=f32, COS=f32, SIN=f32, **common,
                   eps="fp32", offset="fp32", per_position=i32, rot=i32)
        return qkv_norm._fwd, sig, meta
    strides = {n: i32 for n in ("qs", "qb", "qh", "ks", "kb", "kh", "vs", "vb", "vh")}
    sig = dict(X=bf16, W=f32, DQ=bf16, DK=bf16, DV=bf16, RSTD=f32, COS=f32, SIN=f32, DX=bf16,
               DW_PART=f32, **common, offset="fp32", per_position=i32, rot=i32, groups=i32,
               batch=i32, **strides)
    return qkv_norm._bwd, sig, meta


def _full(qkv_full_norm, groups, seg, cfg, flags):
    direction, phase = flags
    seg_args = dict(n_rows=i32, groups=i32, row_stride=i32, seg_stride=i32, seg_off=i32,
                    seg_len=i32)
    meta = dict(PHASE=phase, GB=triton.next_power_of_2(groups), SB=triton.next_power_of_2(seg),
                ROWS=cfg.rows)
    if direction == "fwd":
        sig = dict(X=bf16, W=f32, Y=bf16, SS=f32, RSTD=f32, **seg_args, width=i32, eps="fp32",
                   offset="fp32")
        return qkv_full_norm._fwd, sig, meta
    sig = dict(X=bf16, W=f32, DY=bf16, RSTD=f32, C=f32, DX=bf16, DW_PART=f32, **seg_args,
               width=i32, offset="fp32", dy_s=i32, dy_b=i32, dy_h=i32, batch=i32, hd=i32)
    return qkv_full_norm._bwd, sig, meta


def variants():
    """(name, kernel, signature, constexprs, num_warps, is_default) for every build."""
    from megatron_hybridnorm.kernels import launch, qkv_full_norm, qkv_norm, rmsnorm

    B = (False, True)
    rms = [("fwd", add, bias, drop) for add, bias, drop in itertools.product(B, repeat=3)
           if add or not (bias or drop)] + [("bwd", *f) for f in itertools.product(B, repeat=3)]
    qkv = [(d, v, r, i) for d in ("fwd", "bwd") for v, r, i in itertools.product(B, repeat=3)
           if r or not i]
    full = [(d, phase) for d in ("fwd", "bwd") for phase in (0, 1, 2)]
    builds = (  # (kind, widths, flag sets, build, the flags every candidate config is built with)
        ("rms", RMS_WIDTHS, rms, lambda w, c, f: _rms(launch, rmsnorm, w, c, f),
         (False, False, False)),
        ("qkv", HEAD_DIMS, qkv, lambda hd, c, f: _qkv(qkv_norm, hd, c, f), (True, True, False)),
        ("full", FULL, full, lambda gs, c, f: _full(qkv_full_norm, *gs, c, f), (0,)),
    )
    for kind, widths, flag_sets, build, swept in builds:
        for width in widths:
            # the launch table's width: row width, head_dim, or the padded full-width row
            key = (triton.next_power_of_2(width[0]) * triton.next_power_of_2(width[1])
                   if kind == "full" else width)
            for flags in flag_sets:
                kernel = f"{kind}_{flags[0]}"
                configs = [launch.launch(kernel, key)]
                if width == widths[0] and flags[1:] == swept:
                    configs += launch.candidates(kernel, key)[1:]
                for i, cfg in enumerate(configs):
                    fn, sig, meta = build(width, cfg, flags)
                    yield (f"{kernel} width={width} flags={flags[1:]} {cfg}", fn, sig, meta,
                           cfg.warps, i == 0)


def _ptxas_info(ptx: str, cap: int) -> tuple[int, int]:
    """(registers per thread, spilled bytes) as ptxas reports them for this PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-v", "--gpu-name", arch, f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", out))
    return regs, spill


def resident_warps(registers: int, warps: int) -> int:
    """Warps an SM keeps resident for this build, as registers allow (Hopper: 64K registers,
    allocated per warp in units of 256; at most 64 warps and 32 blocks per SM)."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(32, 65536 // (per_warp * warps))
    return min(64, blocks * warps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("capabilities", nargs="*", type=int, default=[90])
    ap.add_argument("--json", help="write every build's registers and spills here")
    args = ap.parse_args(argv)
    failed, rows = 0, []
    for cap in args.capabilities:
        target = GPUTarget("cuda", cap, 32)
        for name, fn, sig, constexprs, warps, default in variants():
            full = {**sig, **{k: "constexpr" for k in constexprs}}
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=full, constexprs=constexprs),
                                          target=target, options={"num_warps": warps})
                assert compiled.asm.get("cubin"), "no cubin"
                regs, spill = _ptxas_info(compiled.asm["ptx"], cap)
                resident = resident_warps(regs, warps)
                rows.append(dict(name=name, capability=cap, default=default, registers=regs,
                                 spill_bytes=spill, warps=warps, resident_warps=resident))
                print(f"ok   sm_{cap} {name} registers={regs} spill={spill} "
                      f"resident_warps={resident}{' (default)' if default else ''}", flush=True)
            except Exception as e:  # report every failure, then fail
                failed += 1
                print(f"FAIL sm_{cap} {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
