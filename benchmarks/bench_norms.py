"""Measure the norm kernels and the 1.2B HybridNorm block against Pre-Norm, in one run.

    python benchmarks/bench_norms.py --out benchmarks/results.json      # on a CUDA GPU

Prints and writes (JSON), all measured in this run on this card:
- the device-copy bandwidth (the baseline for the kernels' bandwidth fractions);
- forward+backward time and achieved bandwidth of the Triton RMSNorm (16384 x 4096), the fused
  residual add + RMSNorm (HybridNorm's FFN norm, same shape) and the fused Q/K/V norm (16384
  tokens, 32 q heads / 8 KV heads, head_dim 64; also with RoPE in the same pass, against
  Megatron's RoPE alone, which is Pre-Norm's attention pre-processing), against the torch
  paths they replace. The bandwidth counts the bytes the fused kernel must move, for both;
- forward+backward time and peak memory of the paper's 1.2B block (16 layers, d 2048, 32 / 8
  heads, SwiGLU 8192, seq 4096, micro-batch 2, bf16) as Pre-Norm and HybridNorm, each with torch
  norms and with the kernels, on the same local linears and SDPA attention.
``--smoke`` runs tiny shapes (on a CPU under TRITON_INTERPRET=1) to check that it runs at all;
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

PAPER = dict(layers=16, hidden=2048, heads=32, groups=8, ffn=8192, seq=4096, batch=2,
             norm_rows=16384, norm_width=4096, qkv_tokens=16384)
SMOKE = dict(layers=2, hidden=128, heads=4, groups=2, ffn=256, seq=64, batch=2,
             norm_rows=64, norm_width=256, qkv_tokens=64)


def timed(fn, iters: int, warmup: int) -> float:
    """Median seconds of fn() over iters runs, after warmup runs."""
    cuda = torch.cuda.is_available()
    times = []
    for i in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, iters, warmup) -> float:
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    return 2 * x.numel() / timed(lambda: y.copy_(x), iters, warmup)  # bytes/s


def with_kernels(mode: str):
    os.environ["HYBRIDNORM_KERNELS"] = mode


def bench_rms_norm(s, device, dtype, iters, warmup, copy_bw) -> dict:
    from megatron_hybridnorm.norms.functional import normalize

    x = torch.randn(s["norm_rows"], s["norm_width"], device=device, dtype=dtype,
                    requires_grad=True)
    w = torch.ones(s["norm_width"], device=device, requires_grad=True)
    dy = torch.randn_like(x)
    out = {}
    for mode in ("torch", "triton"):
        with_kernels(mode)

        def step():
            x.grad = w.grad = None
            normalize(x, w, None, 1e-5, "RMSNorm").backward(dy)

        t = timed(step, iters, warmup)
        moved = 5 * x.numel() * x.element_size()  # fwd: x in, y out; bwd: x, dy in, dx out
        out[mode] = dict(seconds=t, bandwidth_fraction=moved / t / copy_bw)
    return out


def bench_add_rms_norm(s, device, dtype, iters, warmup, copy_bw) -> dict:
    from megatron_hybridnorm.norms.functional import add_normalize

    shape = (s["norm_rows"], s["norm_width"])
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    a = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(s["norm_width"], device=device, requires_grad=True)
    dy = torch.randn_like(x)
    out = {}
    for mode in ("torch", "triton"):  # torch: Megatron's add, then the norm
        with_kernels(mode)

        def step():
            x.grad = a.grad = w.grad = None
            add_normalize(x, a, None, w, None, 1e-5, "RMSNorm").backward(dy)

        t = timed(step, iters, warmup)
        # fwd: x, a in; sum, y out. bwd: sum, dy in; d(sum) out (the same tensor for x and a)
        moved = 7 * x.numel() * x.element_size()
        out[mode] = dict(seconds=t, bandwidth_fraction=moved / t / copy_bw)
    return out


def bench_qkv_norm(s, device, dtype, iters, warmup, copy_bw) -> dict:
    """The three per-head norms, eager and fused, each without and with RoPE on q and k; and
    Megatron's RoPE alone (Pre-Norm's attention pre-processing)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_hybridnorm.kernels.qkv_norm import qkv_norm, rope_tables
    from megatron_hybridnorm.norms.functional import normalize

    P, hd, g = s["heads"] // s["groups"], s["hidden"] // s["heads"], s["groups"]
    seq = s["seq"]
    batch = s["qkv_tokens"] // seq
    mixed = torch.randn(seq, batch, g, (P + 2) * hd, device=device, dtype=dtype,
                        requires_grad=True)
    ws = [torch.ones(hd, device=device, requires_grad=True) for _ in range(3)]
    freqs = RotaryEmbedding(kv_channels=hd, rotary_percent=1.0, rotary_base=500000)(seq).to(device)
    cfg = TransformerConfig(num_layers=1, hidden_size=s["hidden"], num_attention_heads=s["heads"],
                            apply_rope_fusion=False)

    def split():
        heads = mixed.view(seq, batch, g, P + 2, hd)
        return heads[..., :P, :].reshape(seq, batch, g * P, hd), heads[..., P, :], heads[..., P + 1, :]

    def eager():
        q, k, v = split()
        return tuple(normalize(t, w, None, 1e-5, "RMSNorm", impl="torch")
                     for t, w in zip((q, k, v), ws))

    def rope(q, k, v):
        return (apply_rotary_pos_emb(q, freqs, config=cfg), apply_rotary_pos_emb(k, freqs, config=cfg),
                v)

    def fused(with_rope=False):
        tables = rope_tables(freqs, seq, hd) if with_rope else None
        return qkv_norm(mixed, *ws, heads_per_group=P, head_dim=hd, eps=1e-5, rope=tables)

    variants = (("torch", eager), ("triton", fused), ("rope_alone", lambda: rope(*split())),
                ("torch_then_rope", lambda: rope(*eager())),
                ("triton_with_rope", lambda: fused(with_rope=True)))
    out = {}
    for name, fn in variants:
        def step():
            mixed.grad = None
            outs = fn()
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        t = timed(step, iters, warmup)
        moved = 5 * mixed.numel() * mixed.element_size()  # read, write q/k/v; read dq/dk/dv, write
        out[name] = dict(seconds=t, bandwidth_fraction=moved / t / copy_bw)
    out["time_triton_with_rope_over_rope_alone"] = (out["triton_with_rope"]["seconds"]
                                                   / out["rope_alone"]["seconds"])
    return out


def time_block(s, scheme, device, dtype, iters, warmup) -> dict:
    """Forward+backward seconds and peak memory of one scheme's block (freed on return)."""
    import torch.nn.functional as F
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    import megatron_hybridnorm as mh

    cfg = TransformerConfig(
        num_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
        num_query_groups=s["groups"], ffn_hidden_size=s["ffn"], gated_linear_unit=True,
        activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False)
    block = TransformerBlock(cfg, mh.get_decoder_block_spec(cfg, scheme)).to(device)
    rope = RotaryEmbedding(kv_channels=s["hidden"] // s["heads"], rotary_percent=1.0,
                           rotary_base=500000)(s["seq"]).to(device)
    x = torch.randn(s["seq"], s["batch"], s["hidden"], device=device, dtype=dtype,
                    requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x, attention_mask=None, rotary_pos_emb=rope).backward(dy)

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = timed(step, iters, warmup)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return dict(seconds=t, peak_bytes=peak)


def bench_block(s, device, dtype, iters, warmup) -> dict:
    out = {}
    for label, scheme, mode in (("prenorm", "prenorm", "torch"),
                                ("prenorm_kernels", "prenorm", "triton"),
                                ("hybridnorm_torch_norms", "hybridnorm", "torch"),
                                ("hybridnorm_kernels", "hybridnorm", "triton")):
        with_kernels(mode)
        out[label] = time_block(s, scheme, device, dtype, iters, warmup)
    for hybrid in ("hybridnorm_torch_norms", "hybridnorm_kernels"):
        for base in ("prenorm", "prenorm_kernels"):
            out[f"time_{hybrid}_over_{base}"] = out[hybrid]["seconds"] / out[base]["seconds"]
            if out[base]["peak_bytes"]:
                out[f"peak_{hybrid}_over_{base}"] = (out[hybrid]["peak_bytes"]
                                                     / out[base]["peak_bytes"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, to check that it runs")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        p.exit(2, "bench_norms.py measures a GPU: run it on one (or pass --smoke to check that "
                  "it runs, under TRITON_INTERPRET=1)\n")
    from megatron_hybridnorm.testing import Parallel, init_rank

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_rank(0, 1, port, Parallel(), seed=0)
    s = SMOKE if args.smoke else PAPER
    iters, warmup = (1, 0) if args.smoke else (args.iters, args.warmup)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    copy_bw = copy_bandwidth(device, iters, warmup)
    results = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
        versions=dict(torch=torch.__version__, triton=_version("triton"),
                      megatron_core=_version("megatron-core")),
        date=time.strftime("%Y-%m-%d"), shapes=s, copy_bandwidth_bytes_per_s=copy_bw,
        rms_norm=bench_rms_norm(s, device, dtype, iters, warmup, copy_bw),
        add_rms_norm=bench_add_rms_norm(s, device, dtype, iters, warmup, copy_bw),
        qkv_norm=bench_qkv_norm(s, device, dtype, iters, warmup, copy_bw),
        block=bench_block(s, device, dtype, iters, warmup),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
