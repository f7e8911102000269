"""The Triton kernels against float64 references, with poisoned outputs and non-power-of-two
shapes; on the CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest)."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_hybridnorm import kernels
from megatron_hybridnorm.kernels import rmsnorm as rms_mod
from helpers import rel_err

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel forgets to write shows up."""
    monkeypatch.setattr(rms_mod, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    import importlib

    qkv_mod = importlib.import_module("megatron_hybridnorm.kernels.qkv_norm")

    monkeypatch.setattr(qkv_mod, "_empty", rms_mod._empty)


def close(a, b, dtype, what):
    """``a`` (kernel) against the fp64 reference ``b`` computed from the same low-precision
    inputs: only fp32 arithmetic and the final rounding to ``dtype`` may differ."""
    assert torch.isfinite(a).all(), f"{what}: unwritten (NaN) or non-finite elements"
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    err = rel_err(a, b)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:.3g}"


def rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def ref_rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 200), (5, 3, 64), (3, 1000), (2, 3)])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_rms_norm_matches_fp64(dtype, shape, zero_centered):
    x = rand(*shape, dtype=dtype, seed=0, scale=3.0).requires_grad_(True)
    w = (rand(shape[-1], dtype=torch.float32, seed=1) * 0.3 + (0.0 if zero_centered else 1.0)
         ).requires_grad_(True)
    y = rms_mod.rms_norm(x, w, 1e-5, zero_centered)
    dy = rand(*shape, dtype=dtype, seed=2)
    y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    yr = ref_rms(xr, wr + (1.0 if zero_centered else 0.0))
    yr.backward(dy.double())
    assert y.dtype == dtype and w.grad.dtype == torch.float32
    close(y, yr, dtype, "y")
    close(x.grad, xr.grad, dtype, "dx")
    close(w.grad, wr.grad, torch.float32 if dtype == torch.float32 else dtype, "dw")


QKV_SHAPES = [  # sq, b, groups, heads per group, head_dim
    (5, 3, 2, 3, 48),     # GQA, non-power-of-two head_dim
    (4, 2, 1, 4, 64),     # one KV group
    (3, 1, 4, 1, 256),    # MHA, the largest head_dim
    (2, 2, 2, 2, 72),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=[str(s) for s in QKV_SHAPES])
@pytest.mark.parametrize("norm_v", [True, False])
def test_fused_qkv_norm_matches_fp64(dtype, shape, norm_v):
    from megatron_hybridnorm.kernels.qkv_norm import qkv_norm

    sq, b, ng, P, hd = shape
    mixed = rand(sq, b, ng, (P + 2) * hd, dtype=dtype, seed=3, scale=2.0).requires_grad_(True)
    ws = [(rand(hd, dtype=torch.float32, seed=4 + i) * 0.3 + 1.0).requires_grad_(True)
          for i in range(3)]
    q, k, v = qkv_norm(mixed, ws[0], ws[1], ws[2] if norm_v else None, heads_per_group=P,
                       head_dim=hd, eps=1e-5)
    assert q.shape == (sq, b, ng * P, hd) and k.shape == v.shape == (sq, b, ng, hd)
    grads = [rand(*t.shape, dtype=dtype, seed=10 + i) for i, t in enumerate((q, k, v))]
    torch.autograd.backward((q, k, v), grads)

    m = mixed.detach().double().requires_grad_(True)
    wr = [w.detach().double().requires_grad_(True) for w in ws]
    heads = m.view(sq, b, ng, P + 2, hd)  # Megatron's grouped layout: P q heads, k, v
    Q = ref_rms(heads[..., :P, :], wr[0]).reshape(sq, b, ng * P, hd)
    K = ref_rms(heads[..., P, :], wr[1])
    V = ref_rms(heads[..., P + 1, :], wr[2]) if norm_v else heads[..., P + 1, :]
    torch.autograd.backward((Q, K, V), [g.double() for g in grads])
    for name, a, r in (("q", q, Q), ("k", k, K), ("v", v, V), ("d_mixed", mixed.grad, m.grad)):
        close(a, r, dtype, name)
    wdt = torch.float32 if dtype == torch.float32 else dtype
    for i in range(3 if norm_v else 2):
        close(ws[i].grad, wr[i].grad, wdt, f"dw{'qkv'[i]}")
    if not norm_v:
        assert ws[2].grad is None


def test_fused_qkv_norm_refuses_head_dim_over_256():
    from megatron_hybridnorm.kernels.qkv_norm import qkv_norm

    w = torch.ones(320)
    with pytest.raises(ValueError, match="head_dim up to 256"):
        qkv_norm(torch.zeros(1, 1, 1, 3 * 320), w, w, w, heads_per_group=1, head_dim=320, eps=1e-5)


def test_dispatch_modes(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("HYBRIDNORM_KERNELS", raising=False)
    assert kernels.use_triton(x) == (x.is_cuda and ON_GPU)  # auto: the GPU only
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "torch")
    assert not kernels.use_triton(x)
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "triton")
    assert kernels.use_triton(x)  # the interpreter is on in the tests
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernels.use_triton(x)


def test_forcing_triton_on_a_cpu_without_the_interpreter_is_explained():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HYBRIDNORM_KERNELS"] = "triton"
    out = subprocess.run([sys.executable, "-c", "import torch; from megatron_hybridnorm import "
                          "kernels; kernels.use_triton(torch.zeros(1))"],
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "TRITON_INTERPRET=1" in out.stderr


@pytest.fixture
def forced_kernels(monkeypatch):
    """HYBRIDNORM_KERNELS=triton, counting the calls that reach each kernel."""
    import importlib

    monkeypatch.setenv("HYBRIDNORM_KERNELS", "triton")
    calls = {"rms_norm": 0, "qkv_norm": 0}
    qkv_mod = importlib.import_module("megatron_hybridnorm.kernels.qkv_norm")
    for mod, name in ((rms_mod, "rms_norm"), (qkv_mod, "qkv_norm")):
        original = getattr(mod, name)

        def counted(*a, _f=original, _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)

        monkeypatch.setattr(mod, name, counted)
    return calls


# block 0's input norm, Q/K/V and the residual norm; Q/K without V; zero-centered weights
MODEL_CASES = [("hybridnorm_star", {}), ("prenorm_qknorm", {}),
               ("hybridnorm_star", {"layernorm_zero_centered_gamma": True})]


@pytest.mark.slow
@pytest.mark.parametrize("scheme,config", MODEL_CASES, ids=[f"{s}{'-zc' if c else ''}"
                                                          for s, c in MODEL_CASES])
def test_models_match_the_reference_with_the_kernels(megatron_single_rank, forced_kernels,
                                                     scheme, config):
    """The core issue's reference test, with every RMSNorm and the Q/K/V norms in Triton."""
    from helpers import build_gpt, randomize_norms, tiny_config
    from test_reference import TOL, compare_to_reference

    torch.manual_seed(0)
    cfg = tiny_config(**config)
    model = build_gpt(cfg, scheme)
    randomize_norms(model)
    if config.get("layernorm_zero_centered_gamma"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layernorm" in n:
                    p.sub_(1.0)
    worst, errs = compare_to_reference(model, scheme, cfg)
    assert worst < TOL, {k: v for k, v in errs.items() if v >= TOL}
    assert forced_kernels["rms_norm"] > 0
    assert forced_kernels["qkv_norm"] == 2 * 4  # 4 layers, 2 forward passes


@pytest.mark.slow
def test_tensor_parallel_training_with_the_kernels(monkeypatch):
    """TP=2 + SP against one rank with the kernels forced on every rank: the per-head weights'
    TP gradient handling goes through the fused kernel's weight gradient."""
    from megatron_hybridnorm.testing import Parallel, run_distributed
    from test_tensor_parallel import assert_same_training

    import dist_cases

    monkeypatch.setenv("HYBRIDNORM_KERNELS", "triton")  # inherited by the spawned ranks
    cases = [dict(scheme="hybridnorm_star", sp=True)]
    one = run_distributed(dist_cases.train_cases, 1, Parallel(), args=(cases,), timeout=900)[0]
    tp2 = run_distributed(dist_cases.train_cases, 2, Parallel(tp=2), args=(cases,), timeout=900)
    assert_same_training(one[0], [r[0] for r in tp2])
