"""Measure the norm kernels and the paper's 1.2B block, local and Transformer Engine backends, in
one run, and write every figure to one JSON file.

    python benchmarks/bench_norms.py --out results.json            # on a CUDA GPU
    python benchmarks/bench_norms.py --smoke --out smoke.json      # any machine: tiny shapes

All measured in this run, on this card, with CUDA-event timing (``triton.testing.do_bench``:
median of repeated runs after warm-up, L2 flushed between runs):
- ``copy``: the device-copy bandwidth, the baseline of every bandwidth fraction;
- ``kernels``: forward and forward+backward time of the Triton RMSNorm and residual add + RMSNorm
  (16384 x 4096) and the per-head Q/K/V norm (16384 tokens, 32 q / 8 KV heads, head_dim 64;
  also with RoPE in the same pass, against eager norms + Megatron's RoPE and Megatron's RoPE
  alone, Pre-Norm's attention pre-processing), against the torch paths they replace. The
  fraction of copy bandwidth counts the bytes the fused kernel must move, for both paths;
- ``tune``: every candidate launch config of each kernel (``kernels/launch.py``), the best, and
  its time against the default;
- ``local`` and ``te``: forward+backward time and peak memory of the 1.2B block (16 layers,
  d 2048, 32 / 8 heads, SwiGLU 8192, seq 4096, micro-batch 2, bf16) per scheme, with torch norms
  and with the kernels on local linears + SDPA, and on TE in BF16 and FP8 (delayed and
  tensorwise scaling) with the ``te_ffn_norm`` choices; every time and peak as a ratio to
  Pre-Norm on the same backend and precision.
``--smoke`` runs tiny shapes (on a CPU under TRITON_INTERPRET=1) to check that everything runs
and that the JSON has every field; its numbers mean nothing. A part that cannot run (no TE) is
recorded with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback

from pathlib import Path

import torch

PAPER = dict(layers=16, hidden=2048, heads=32, groups=8, ffn=8192, seq=4096, batch=2,
             norm_rows=16384, norm_width=4096, qkv_tokens=16384)
SMOKE = dict(layers=2, hidden=128, heads=4, groups=2, ffn=256, seq=64, batch=2,
             norm_rows=64, norm_width=256, qkv_tokens=64)
PARTS = ("kernels", "tune", "local", "te")
TE_PRECISIONS = {"bf16": {}, "fp8_delayed": dict(fp8="hybrid", fp8_recipe="delayed"),
                 "fp8_tensorwise": dict(fp8="hybrid", fp8_recipe="tensorwise")}
# (label, scheme, options) of the TE blocks; ffn_norm: the te_ffn_norm candidates
TE_BLOCKS = [("prenorm", "prenorm", {}), ("hybridnorm", "hybridnorm", {}),
             ("hybridnorm_fused_add", "hybridnorm", {"te_ffn_norm": "fused_add"}),
             ("hybridnorm_in_linear", "hybridnorm", {"te_ffn_norm": "in_linear"}),
             ("hybridnorm_star", "hybridnorm_star", {})]
LOCAL_BLOCKS = [("prenorm", "prenorm", "torch"), ("prenorm_kernels", "prenorm", "triton"),
                ("hybridnorm_torch_norms", "hybridnorm", "torch"),
                ("hybridnorm_kernels", "hybridnorm", "triton"),
                ("hybridnorm_star_kernels", "hybridnorm_star", "triton")]


class Timer:
    """Median seconds of ``fn()``: CUDA events via do_bench on a GPU, one wall-clock run in a
    smoke run (which only checks that things run)."""

    def __init__(self, smoke: bool, warmup_ms: float = 50, rep_ms: float = 200):
        self.smoke, self.warmup_ms, self.rep_ms = smoke, warmup_ms, rep_ms

    def __call__(self, fn, rep_ms: float | None = None) -> float:
        if self.smoke:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        from triton.testing import do_bench

        fn()  # compile and allocate outside the timing
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=self.warmup_ms, rep=rep_ms or self.rep_ms,
                      return_mode="median")
        return ms / 1e3


def kernel_mode(mode: str):
    os.environ["HYBRIDNORM_KERNELS"] = mode


def copy_bandwidth(device, timer) -> float:
    n = (256 if device.type == "cuda" else 1) * 2**20
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * n / timer(lambda: y.copy_(x))  # bytes/s: read and write


def _fwd_and_step(run, grads_of):
    """(forward only, forward + backward) callables from ``run()`` -> outputs."""
    def fwd():
        with torch.no_grad():
            run()

    def step():
        for t in grads_of:
            t.grad = None
        outs = run()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return fwd, step


def measure(timer, run, grads_of, bytes_fwd, bytes_step, copy_bw) -> dict:
    fwd, step = _fwd_and_step(run, grads_of)
    t_fwd, t_step = timer(fwd), timer(step)
    return dict(seconds_fwd=t_fwd, seconds_fwd_bwd=t_step,
                bandwidth_fraction_fwd=bytes_fwd / t_fwd / copy_bw,
                bandwidth_fraction_fwd_bwd=bytes_step / t_step / copy_bw)


def bench_kernels(s, device, dtype, timer, copy_bw) -> dict:
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_hybridnorm.kernels.qkv_norm import qkv_norm, rope_tables
    from megatron_hybridnorm.norms.functional import add_normalize, normalize

    out = {}
    rows, width = s["norm_rows"], s["norm_width"]
    x = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
    a = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(width, device=device, requires_grad=True)
    e = x.numel() * x.element_size()
    for impl in ("torch", "triton"):
        # RMSNorm: fwd reads x, writes y; bwd reads x, dy, writes dx
        out.setdefault("rms_norm", {})[impl] = measure(
            timer, lambda: normalize(x, w, None, 1e-5, "RMSNorm", impl=impl), (x, w),
            2 * e, 5 * e, copy_bw)
        # add + RMSNorm: fwd reads x, a, writes s, y; bwd reads s, dy, writes d(s)
        out.setdefault("add_rms_norm", {})[impl] = measure(
            timer, lambda: add_normalize(x, a, None, w, None, 1e-5, "RMSNorm", impl=impl),
            (x, a, w), 4 * e, 7 * e, copy_bw)

    P, hd, g = s["heads"] // s["groups"], s["hidden"] // s["heads"], s["groups"]
    seq = s["seq"]
    b = max(1, s["qkv_tokens"] // seq)
    mixed = torch.randn(seq, b, g, (P + 2) * hd, device=device, dtype=dtype, requires_grad=True)
    ws = [torch.ones(hd, device=device, requires_grad=True) for _ in range(3)]
    freqs = RotaryEmbedding(kv_channels=hd, rotary_percent=1.0, rotary_base=500000)(seq)
    freqs = freqs.to(device)
    cfg = TransformerConfig(num_layers=1, hidden_size=s["hidden"], num_attention_heads=s["heads"],
                            apply_rope_fusion=False)

    def split():
        heads = mixed.view(seq, b, g, P + 2, hd)
        return (heads[..., :P, :].reshape(seq, b, g * P, hd), heads[..., P, :],
                heads[..., P + 1, :])

    def eager():
        return tuple(normalize(t, wt, None, 1e-5, "RMSNorm", impl="torch")
                     for t, wt in zip(split(), ws))

    def rope(q, k, v):
        return (apply_rotary_pos_emb(q, freqs, config=cfg),
                apply_rotary_pos_emb(k, freqs, config=cfg), v)

    def fused(with_rope=False):
        tables = rope_tables(freqs, seq, hd) if with_rope else None
        return qkv_norm(mixed, *ws, heads_per_group=P, head_dim=hd, eps=1e-5, rope=tables)

    m = mixed.numel() * mixed.element_size()  # fwd: read, write q/k/v; bwd: read x, dq/dk/dv,
    qkv = {}                                  # write dx
    for name, run in (("torch", eager), ("triton", fused), ("rope_alone", lambda: rope(*split())),
                      ("torch_then_rope", lambda: rope(*eager())),
                      ("triton_with_rope", lambda: fused(with_rope=True))):
        qkv[name] = measure(timer, run, (mixed, *ws), 2 * m, 5 * m, copy_bw)
    qkv["time_triton_with_rope_over_rope_alone"] = (qkv["triton_with_rope"]["seconds_fwd_bwd"]
                                                   / qkv["rope_alone"]["seconds_fwd_bwd"])
    out["qkv_norm"] = qkv
    for part in ("rms_norm", "add_rms_norm", "qkv_norm"):
        out[part]["time_triton_over_torch"] = (out[part]["triton"]["seconds_fwd_bwd"]
                                               / out[part]["torch"]["seconds_fwd_bwd"])
    return out


def bench_tune(s, device, dtype, timer) -> dict:
    """Every candidate launch config of the RMSNorm and per-head Q/K/V kernels at the paper's
    widths (the hidden size; head_dim): forward kernels timed on the forward, backward kernels
    on forward + backward with the default forward."""
    from dataclasses import asdict

    from megatron_hybridnorm.kernels import launch
    from megatron_hybridnorm.kernels.qkv_norm import qkv_norm
    from megatron_hybridnorm.kernels.rmsnorm import add_rms_norm

    kernel_mode("triton")
    rows, width = s["norm_rows"], s["hidden"]
    x = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
    a = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(width, device=device, requires_grad=True)
    P, hd, g = s["heads"] // s["groups"], s["hidden"] // s["heads"], s["groups"]
    mixed = torch.randn(s["qkv_tokens"], 1, g, (P + 2) * hd, device=device, dtype=dtype,
                        requires_grad=True)
    ws = [torch.ones(hd, device=device, requires_grad=True) for _ in range(3)]
    runs = {"rms": (lambda: add_rms_norm(x, a, None, w, 1e-5), (x, a, w), width),
            "qkv": (lambda: qkv_norm(mixed, *ws, heads_per_group=P, head_dim=hd, eps=1e-5),
                    (mixed, *ws), hd)}
    out = {}
    for kernel in ("rms_fwd", "rms_bwd", "qkv_fwd", "qkv_bwd"):
        run, leaves, key = runs[kernel[:3]]
        fwd, step = _fwd_and_step(run, leaves)
        rows_out = []
        for cfg in launch.candidates(kernel, key):
            with launch.forced(kernel, cfg):
                rows_out.append(dict(config=asdict(cfg),
                                     seconds=timer(fwd if kernel.endswith("fwd") else step)))
        best = min(rows_out, key=lambda r: r["seconds"])
        out[kernel] = dict(width=key, candidates=rows_out, default=rows_out[0]["config"],
                           best=best["config"],
                           time_best_over_default=best["seconds"] / rows_out[0]["seconds"])
    return out


def block_config(s, dtype, te: bool, cuda: bool, **extra):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
        num_query_groups=s["groups"], ffn_hidden_size=s["ffn"], gated_linear_unit=True,
        activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=cuda, bias_dropout_fusion=cuda,
        apply_rope_fusion=te, gradient_accumulation_fusion=False,
        transformer_impl="transformer_engine" if te else "local",
        use_cpu_initialization=not cuda, **extra)


def time_block(s, cfg, scheme, device, timer, te: bool, **options) -> dict:
    """Forward+backward seconds and peak memory of one block."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    import megatron_hybridnorm as mh

    if device.type == "cuda":
        torch.cuda.empty_cache()  # the blocks measured before are gone

    with torch.device(device):
        spec = mh.get_decoder_block_spec(cfg, scheme, use_transformer_engine=te, **options)
        block = TransformerBlock(cfg, spec)
        rope = RotaryEmbedding(kv_channels=s["hidden"] // s["heads"], rotary_percent=1.0,
                               rotary_base=500000)(s["seq"])
    x = torch.randn(s["seq"], s["batch"], s["hidden"], device=device, dtype=cfg.params_dtype,
                    requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x, attention_mask=None, rotary_pos_emb=rope).backward(dy)

    cuda = device.type == "cuda"
    peak = None
    if cuda:  # one step on its own: the timer's own buffers stay out of the peak
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    return dict(seconds=timer(step, rep_ms=1500), peak_bytes=peak)


def ratios(results: dict, base: str) -> dict:
    """Each entry's time (and peak) over ``base``'s (none where ``base`` failed)."""
    out = {}
    if "seconds" not in results.get(base, {}):
        return out
    for label, r in results.items():
        if label == base or not isinstance(r, dict) or "seconds" not in r:
            continue
        out[f"time_{label}_over_{base}"] = r["seconds"] / results[base]["seconds"]
        if r.get("peak_bytes") and results[base].get("peak_bytes"):
            out[f"peak_{label}_over_{base}"] = r["peak_bytes"] / results[base]["peak_bytes"]
    return out


def bench_local(s, device, dtype, timer) -> dict:
    cuda = device.type == "cuda"
    out = {}
    for label, scheme, mode in LOCAL_BLOCKS:
        kernel_mode(mode)
        out[label] = time_block(s, block_config(s, dtype, te=False, cuda=cuda), scheme, device,
                                timer, te=False)
    out.update(ratios(out, "prenorm"))
    out.update(ratios(out, "prenorm_kernels"))
    return out


def bench_te(s, device, dtype, timer) -> dict:
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if not HAVE_TE or device.type != "cuda":
        return {"skipped": "needs Transformer Engine and a CUDA device"}
    kernel_mode("auto")
    out = {}
    for precision, fp8 in TE_PRECISIONS.items():
        runs = {}
        for label, scheme, options in TE_BLOCKS:
            cfg = block_config(s, dtype, te=True, cuda=True, **fp8)
            runs[label] = _guarded(lambda: time_block(s, cfg, scheme, device, timer, te=True,
                                                      **options))
        runs.update(ratios(runs, "prenorm"))
        out[precision] = runs
    for label, _, _ in TE_BLOCKS:
        for fp8 in ("fp8_delayed", "fp8_tensorwise"):
            a, b = out[fp8].get(label, {}), out["bf16"].get(label, {})
            if "seconds" in a and "seconds" in b:
                out[f"time_{label}_{fp8}_over_bf16"] = a["seconds"] / b["seconds"]
    return out


def _guarded(fn):
    """Run one measurement; a failure is recorded (with its traceback) instead of ending the
    run, so that one broken configuration does not cost the others."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded in the results
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (dist, dist.replace("-", "_")):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "not installed"


def environment(device) -> dict:
    cuda = device.type == "cuda"
    return dict(
        device=torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
        sms=torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        versions=dict(torch=torch.__version__, cuda=torch.version.cuda,
                      triton=_version("triton"), megatron_core=_version("megatron-core"),
                      transformer_engine=_version("transformer-engine")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, to check that it runs")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)}")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        p.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        p.exit(2, "bench_norms.py measures a GPU: run it on one (or pass --smoke to check that "
                  "it runs, under TRITON_INTERPRET=1)\n")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from launcher import Parallel, init_rank  # the tests' launcher (not in the wheel)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_rank(0, 1, port, Parallel(), seed=0)
    s = SMOKE if args.smoke else PAPER
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = Timer(smoke=args.smoke)
    results = dict(environment(device), shapes=s, smoke=args.smoke)
    results["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device, timer)
    steps = dict(kernels=lambda: bench_kernels(s, device, dtype, timer,
                                               results["copy_bandwidth_bytes_per_s"]),
                 tune=lambda: bench_tune(s, device, dtype, timer),
                 local=lambda: bench_local(s, device, dtype, timer),
                 te=lambda: bench_te(s, device, dtype, timer))
    for part in PARTS:
        if part not in parts:
            results[part] = {"skipped": "not asked for (--parts)"}
            continue
        t0 = time.monotonic()
        results[part] = _guarded(steps[part])
        results[part]["wall_seconds"] = time.monotonic() - t0
        _write(args.out, results)  # after every part: a later failure keeps the earlier ones
    print(json.dumps(results, indent=2))
    return 1 if any("error" in results[part] for part in parts) else 0


def _write(path, results):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
