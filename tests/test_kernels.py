"""The Triton kernels against float64 references, with poisoned outputs and non-power-of-two
shapes; on the CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest)."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from megatron_hybridnorm import kernels
from megatron_hybridnorm.kernels import launch
from megatron_hybridnorm.kernels import rmsnorm as rms_mod
from helpers import on_devices, rel_err

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel forgets to write shows up."""
    monkeypatch.setattr(launch, "empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


def close(a, b, dtype, what):
    """``a`` (kernel) against the fp64 reference ``b`` computed from the same low-precision
    inputs: only fp32 arithmetic and the final rounding to ``dtype`` may differ."""
    assert torch.isfinite(a).all(), f"{what}: unwritten (NaN) or non-finite elements"
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    err = rel_err(a, b)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:.3g}"


def rand(*shape, dtype, seed, device, scale=1.0):
    """Seeded normal values, drawn on the CPU (the same on any device), moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cpu") * scale).to(dtype).to(device)


def weight(width, seed, device, base=1.0):
    """A norm weight near ``base`` (fp32, requires grad)."""
    return (rand(width, dtype=torch.float32, seed=seed, device=device) * 0.3 + base
            ).requires_grad_(True)


def ref_rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16
RMS_SHAPES = [(37, 200), (5, 3, 64), (3, 1000), (2, 3)]


@on_devices("dtype,shape,zero_centered",
            list(itertools.product(DTYPES, RMS_SHAPES, [False, True])),
            on_gpu=lambda d, s, z: (d != F16 and s in RMS_SHAPES[::2] and not z)
            or (d, s, z) == (F16, RMS_SHAPES[1], True))
def test_rms_norm_matches_fp64(device, dtype, shape, zero_centered):
    x = rand(*shape, dtype=dtype, seed=0, device=device, scale=3.0).requires_grad_(True)
    w = weight(shape[-1], 1, device, base=0.0 if zero_centered else 1.0)
    y = rms_mod.rms_norm(x, w, 1e-5, zero_centered)
    dy = rand(*shape, dtype=dtype, seed=2, device=device)
    y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    yr = ref_rms(xr, wr + (1.0 if zero_centered else 0.0))
    yr.backward(dy.double())
    assert y.dtype == dtype and w.grad.dtype == torch.float32
    close(y, yr, dtype, "y")
    close(x.grad, xr.grad, dtype, "dx")
    close(w.grad, wr.grad, torch.float32 if dtype == torch.float32 else dtype, "dw")


ADD_CASES = [  # shape, residual dtype (None: as a), bias
    ((37, 200), None, True),
    ((5, 3, 64), None, False),
    ((3, 1000), torch.float32, True),   # fp32_residual_connection: fp32 residual, low-precision a
    ((2, 3), None, False),
]


@on_devices("dtype,shape,x_dtype,bias", [(d, *c) for d in DTYPES for c in ADD_CASES],
            on_gpu=lambda d, s, x, b: d == BF16 or (d == F16 and s == ADD_CASES[0][0]))
def test_add_rms_norm_matches_fp64(device, dtype, shape, x_dtype, bias):
    """N(x + a + bias): the sum is stored in the output dtype (as Megatron's add stores it) and
    that rounded sum is normalized; gradients flow to x, a, bias and the weight."""
    x_dtype = x_dtype or dtype
    x = rand(*shape, dtype=x_dtype, seed=0, device=device, scale=2.0).requires_grad_(True)
    a = rand(*shape, dtype=dtype, seed=1, device=device).requires_grad_(True)
    b = rand(shape[-1], dtype=dtype, seed=2, device=device).requires_grad_(True) if bias else None
    w = weight(shape[-1], 3, device)
    y = rms_mod.add_rms_norm(x, a, b, w, 1e-5)
    out_dtype = torch.promote_types(x_dtype, dtype)
    dy = rand(*shape, dtype=out_dtype, seed=4, device=device)
    y.backward(dy)

    leaves = [t.detach().double().requires_grad_(True) for t in (x, a, w)]
    xr, ar, wr = leaves
    br = b.detach().double().requires_grad_(True) if bias else None
    s = xr + ar + (br if bias else 0.0)
    s = s + (s.to(out_dtype).double() - s).detach()  # rounded like the stored sum
    yr = ref_rms(s, wr)
    yr.backward(dy.double())
    assert y.dtype == out_dtype and y.shape == a.shape
    assert x.grad.dtype == x_dtype and a.grad.dtype == dtype
    close(y, yr, out_dtype, "y")
    close(x.grad, xr.grad, out_dtype, "dx")
    close(a.grad, ar.grad, dtype, "da")
    close(w.grad, wr.grad, torch.float32 if out_dtype == torch.float32 else out_dtype, "dw")
    if bias:
        close(b.grad, br.grad, dtype, "dbias")


@on_devices("dtype,shape,p", [(d, *c) for d in (F32, BF16)
                               for c in (((37, 200), 0.3), ((3, 1000), 0.1))],
            on_gpu=lambda d, s, p: d == BF16)
def test_add_rms_norm_with_dropout_matches_fp64_under_its_mask(device, dtype, shape, p):
    """N(x + dropout(a + bias)): the mask is Philox's draw at the seed taken from torch's
    generator (element (row, col): lane col % 4 of the four draws at counter
    row * ceil(cols / 4) + col // 4); rebuilt here element by element, the fp64 reference uses
    it in forward and backward. The drop rate is p, the same torch seed gives the same result,
    another does not."""
    import triton
    import triton.language as tl

    @triton.jit
    def draw(SEED, OUT, n, cols, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row, col = offs // cols, offs % cols
        u0, u1, u2, u3 = tl.rand4x(tl.load(SEED), row.to(tl.int64) * ((cols + 3) // 4) + col // 4)
        lane = col % 4
        u = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
        tl.store(OUT + offs, u, mask=offs < n)

    x = rand(*shape, dtype=dtype, seed=0, device=device, scale=2.0).requires_grad_(True)
    a = rand(*shape, dtype=dtype, seed=1, device=device).requires_grad_(True)
    b = rand(shape[-1], dtype=dtype, seed=2, device=device).requires_grad_(True)
    w = weight(shape[-1], 3, device)
    torch.manual_seed(11)
    y = rms_mod.add_rms_norm(x, a, b, w, 1e-5, dropout_p=p)
    dy = rand(*shape, dtype=dtype, seed=4, device=device)
    y.backward(dy)

    torch.manual_seed(11)
    seed = rms_mod.draw_seed(device)
    assert any(rms_mod.draw_seed(device).item() >= 2**32 for _ in range(4))  # more than 31 bits
    uniform = torch.empty(x.numel(), device=device)
    draw[(triton.cdiv(x.numel(), 1024),)](seed, uniform, x.numel(), shape[-1], BLOCK=1024)
    keep = (uniform >= p).view(shape)
    assert abs(1 - keep.double().mean().item() - p) < 0.03  # the drop rate

    xr, ar, br, wr = (t.detach().double().requires_grad_(True) for t in (x, a, b, w))
    s = xr + torch.where(keep, (ar + br) / (1 - p), 0.0)
    s = s + (s.to(dtype).double() - s).detach()
    ref_rms(s, wr).backward(dy.double())
    with torch.no_grad():
        yr = ref_rms(s, wr)
    close(y, yr, dtype, "y")
    close(x.grad, xr.grad, dtype, "dx")
    close(a.grad, ar.grad, dtype, "da")
    close(b.grad, br.grad, dtype, "dbias")
    close(w.grad, wr.grad, torch.float32 if dtype == torch.float32 else dtype, "dw")
    assert (a.grad[~keep] == 0).all()

    torch.manual_seed(11)
    assert torch.equal(rms_mod.add_rms_norm(x, a, b, w, 1e-5, dropout_p=p), y)
    torch.manual_seed(12)
    assert not torch.equal(rms_mod.add_rms_norm(x, a, b, w, 1e-5, dropout_p=p), y)


LAUNCHES = [  # (widest single-pass row, forced rms_fwd / rms_bwd config)
    (64, None),                                    # 200 and 1000 wide rows in chunks of 64
    (8192, launch.Launch(rows=1, warps=4, programs_per_sm=1)),
    (8192, launch.Launch(rows=8, warps=8, programs_per_sm=2)),
    (64, launch.Launch(rows=4, warps=4, programs_per_sm=1)),
]


@pytest.mark.parametrize("max_block,config", LAUNCHES, ids=[str(c) for c in LAUNCHES])
def test_rms_kernels_under_other_launch_shapes(device, monkeypatch, max_block, config):
    """Chunked rows (wider than the single-pass tile) and other tile/grid shapes: the same
    fp64 checks, dropout (its mask depends only on the element) included."""
    import contextlib

    monkeypatch.setattr(launch, "MAX_BLOCK", max_block)
    with contextlib.ExitStack() as stack:
        if config is not None:
            stack.enter_context(launch.forced("rms_fwd", config))
            stack.enter_context(launch.forced("rms_bwd", config))
        for dtype in (torch.float32, torch.bfloat16):
            test_rms_norm_matches_fp64(device, dtype, (37, 200), True)
            for case in ADD_CASES[:3]:
                test_add_rms_norm_matches_fp64(device, dtype, *case)
            test_add_rms_norm_with_dropout_matches_fp64_under_its_mask(device, dtype, (3, 1000),
                                                                       0.1)


def test_rms_kernels_take_strided_rows(device):
    """Rows with a stride (a slice of a wider tensor) are read in place, as the same values."""
    base = rand(6, 300, dtype=torch.float32, seed=0, device=device)
    x = base[:, :200]
    w = torch.ones(200, device=device)
    assert not x.is_contiguous() and rms_mod._as_rows(x, 200).data_ptr() == x.data_ptr()
    assert torch.equal(rms_mod.rms_norm(x, w, 1e-5), rms_mod.rms_norm(x.contiguous(), w, 1e-5))


def test_add_rms_norm_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        rms_mod.add_rms_norm(torch.zeros(2, 4), torch.zeros(1, 4), None, torch.ones(4), 1e-5)


QKV_SHAPES = [  # sq, b, groups, heads per group, head_dim
    (5, 3, 2, 3, 48),     # GQA, non-power-of-two head_dim
    (4, 2, 1, 4, 64),     # one KV group
    (3, 1, 4, 1, 256),    # MHA, the largest head_dim
    (2, 2, 2, 2, 72),
    (3, 2, 3, 2, 40),     # three KV groups
]


def ref_head_qkv(m, ws, ng, P, hd, norm_v):
    """fp64 per-head Q/K/V RMSNorm on Megatron's grouped layout: P q heads, k, v per group."""
    sq, b = m.shape[:2]
    heads = m.view(sq, b, ng, P + 2, hd)
    Q = ref_rms(heads[..., :P, :], ws[0]).reshape(sq, b, ng * P, hd)
    K = ref_rms(heads[..., P, :], ws[1])
    V = ref_rms(heads[..., P + 1, :], ws[2]) if norm_v else heads[..., P + 1, :]
    return Q, K, V


def ref_full_qkv(m, ws, ng, P, hd, norm_v):
    """fp64 full-width Q/K/V RMSNorm on the grouped layout: one row of all q heads, one of k."""
    sq, b = m.shape[:2]
    heads = m.view(sq, b, ng, P + 2, hd)
    Q = ref_rms(heads[..., :P, :].reshape(sq, b, ng * P * hd), ws[0]).view(sq, b, ng * P, hd)
    K = ref_rms(heads[..., P, :].reshape(sq, b, ng * hd), ws[1]).view(sq, b, ng, hd)
    V = heads[..., P + 1, :]
    if norm_v:
        V = ref_rms(V.reshape(sq, b, ng * hd), ws[2]).view(sq, b, ng, hd)
    return Q, K, V


def qkv_kernel(mode):
    """(kernel, fp64 reference, weight widths(ng, P, hd), extra kwargs) of a Q/K/V norm mode."""
    from megatron_hybridnorm.kernels.qkv_full_norm import qkv_full_norm
    from megatron_hybridnorm.kernels.qkv_norm import qkv_norm

    if mode == "head":
        return qkv_norm, ref_head_qkv, lambda ng, P, hd: (hd, hd, hd), lambda ng, P, hd: {}
    return (qkv_full_norm, ref_full_qkv, lambda ng, P, hd: (ng * P * hd, ng * hd, ng * hd),
            lambda ng, P, hd: {"widths": (ng * P * hd, ng * hd)})


def incoming_grad(shape, dtype, seed, layout, device):
    """A gradient for a [s, b, heads, head_dim] output, laid out as attention's backward may
    hand it over: "sbhd" (contiguous) or "bhsd" (the [s, b, heads, hd] view of a contiguous
    [b, heads, s, hd] tensor, as SDPA's gradient arrives through a permute)."""
    if layout == "sbhd":
        return rand(*shape, dtype=dtype, seed=seed, device=device)
    s, b, h, d = shape
    g = rand(b, h, s, d, dtype=dtype, seed=seed, device=device).permute(2, 0, 1, 3)
    assert not g.is_contiguous()
    return g


def check_qkv_against_fp64(outs, mixed, ws, dtype, norm_v, reference, layout="bhsd"):
    """Backpropagates random gradients (strided, by default) through a kernel's (q, k, v) and
    through ``reference`` (fp64, from the same inputs) and compares outputs, d(mixed) and the
    weight gradients."""
    grads = [incoming_grad(t.shape, dtype, 10 + i, layout, mixed.device)
             for i, t in enumerate(outs)]
    torch.autograd.backward(outs, grads)
    m = mixed.detach().double().requires_grad_(True)
    wr = [w.detach().double().requires_grad_(True) for w in ws]
    refs = reference(m, wr)
    torch.autograd.backward(refs, [g.double() for g in grads])
    for name, a, r in zip(("q", "k", "v"), outs, refs):
        close(a, r, dtype, name)
    close(mixed.grad, m.grad, dtype, "d_mixed")
    wdt = torch.float32 if dtype == torch.float32 else dtype
    for i in range(3 if norm_v else 2):
        close(ws[i].grad, wr[i].grad, wdt, f"dw{'qkv'[i]}")
    if not norm_v:
        assert ws[2].grad is None


@on_devices("mode,dtype,shape,norm_v,layout",
            list(itertools.product(["head", "full"], DTYPES, QKV_SHAPES, [True, False],
                                   ["sbhd", "bhsd"])),
            on_gpu=lambda m, d, s, v, lay: (d == BF16 and s in QKV_SHAPES[::2] and v)
            or (d in (F32, F16) and s == QKV_SHAPES[1] and not v and lay == "bhsd"))
def test_fused_qkv_norm_matches_fp64(device, mode, dtype, shape, norm_v, layout):
    kernel, reference, widths, extra = qkv_kernel(mode)
    sq, b, ng, P, hd = shape
    mixed = rand(sq, b, ng, (P + 2) * hd, dtype=dtype, seed=3, device=device,
                 scale=2.0).requires_grad_(True)
    ws = [weight(n, 4 + i, device) for i, n in enumerate(widths(ng, P, hd))]
    q, k, v = kernel(mixed, ws[0], ws[1], ws[2] if norm_v else None, heads_per_group=P,
                     head_dim=hd, eps=1e-5, **extra(ng, P, hd))
    assert q.shape == (sq, b, ng * P, hd) and k.shape == v.shape == (sq, b, ng, hd)
    check_qkv_against_fp64((q, k, v), mixed, ws, dtype, norm_v,
                           lambda m, wr: reference(m, wr, ng, P, hd, norm_v), layout)


def test_strided_gradients_reach_the_kernels_in_place():
    g = incoming_grad((3, 2, 4, 8), torch.float32, 0, "bhsd", "cpu")
    assert launch.heads_view(g, 3, 2, 4, 8).data_ptr() == g.data_ptr()
    assert launch.heads_view(g, 3, 2, 4, 8).stride() == g.stride()


QKV_LAUNCHES = [launch.Launch(rows=1, warps=2, programs_per_sm=1),
                launch.Launch(rows=4, warps=4, programs_per_sm=1),
                launch.Launch(rows=64, warps=8, programs_per_sm=2)]


@pytest.mark.parametrize("config", QKV_LAUNCHES, ids=str)
def test_qkv_kernels_under_other_launch_shapes(device, config):
    """Tiles of 1 to 64 heads (rows for the full-width kernel), a grid of 1 to 6 programs: the
    same fp64 checks, RoPE included."""
    with launch.forced("qkv_fwd", config), launch.forced("qkv_bwd", config), \
            launch.forced("full_fwd", config), launch.forced("full_bwd", config):
        for mode in ("head", "full"):
            for dtype in (torch.float32, torch.bfloat16):
                test_fused_qkv_norm_matches_fp64(device, mode, dtype, QKV_SHAPES[0], True, "bhsd")
        test_fused_qkv_norm_with_rope_matches_fp64(device, torch.float32, ROPE_CASES[1], True)
        test_fused_qkv_norm_with_rope_matches_fp64(device, torch.bfloat16, ROPE_CASES[2], False)


def ref_rope(t, freqs, interleaved, mscale):
    """Megatron's RoPE (bshd) in float64: the first rot_dim positions rotate, the rest pass."""
    rot = freqs.shape[-1]
    t, rest = t[..., :rot], t[..., rot:]
    if interleaved:
        x1, x2 = t[..., ::2], t[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).view(t.shape)
    else:
        x1, x2 = torch.chunk(t, 2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    f = freqs.double()
    return torch.cat((t * torch.cos(f) * mscale + rotated * torch.sin(f) * mscale, rest), dim=-1)


ROPE_CASES = [  # shape (sq, b, groups, P, hd), rotary dim, interleaved, mscale
    ((5, 3, 2, 3, 48), 48, False, 1.0),
    ((4, 2, 1, 4, 64), 32, False, 1.0),    # partial rotary: half the head passes through
    ((3, 2, 2, 2, 72), 72, True, 1.0),     # interleaved pairs
    ((3, 1, 4, 1, 256), 128, False, 1.3),  # YaRN-style mscale
]


@on_devices("dtype,case,norm_v", list(itertools.product(DTYPES, ROPE_CASES, [True, False])),
            on_gpu=lambda d, c, v: (d == BF16 and v) or (d == F32 and c == ROPE_CASES[0]
                                                           and not v))
def test_fused_qkv_norm_with_rope_matches_fp64(device, dtype, case, norm_v):
    """Norm, then RoPE on q and k (v is never rotated), in one pass, against Megatron's RoPE
    applied to the fp64 reference's normalized heads; gradients through both."""
    from megatron_hybridnorm.kernels.qkv_norm import qkv_norm, rope_tables

    (sq, b, ng, P, hd), rot, interleaved, mscale = case
    mixed = rand(sq, b, ng, (P + 2) * hd, dtype=dtype, seed=3, device=device,
                 scale=2.0).requires_grad_(True)
    ws = [weight(hd, 4 + i, device) for i in range(3)]
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64, device=device) / rot))
    angles = torch.outer(torch.arange(sq + 2, dtype=torch.float64, device=device), inv)
    freqs = (torch.stack((angles, angles), -1).flatten(-2) if interleaved
             else torch.cat((angles, angles), -1))[:, None, None, :]
    q, k, v = qkv_norm(mixed, ws[0], ws[1], ws[2] if norm_v else None, heads_per_group=P,
                       head_dim=hd, eps=1e-5, rope=rope_tables(freqs.float(), sq, hd, mscale),
                       rope_interleaved=interleaved)
    f = freqs[:sq].float().double()  # the kernel gets fp32 angles, as Megatron's are

    def reference(m, wr):
        Q, K, V = ref_head_qkv(m, wr, ng, P, hd, norm_v)
        return ref_rope(Q, f, interleaved, mscale), ref_rope(K, f, interleaved, mscale), V

    check_qkv_against_fp64((q, k, v), mixed, ws, dtype, norm_v, reference)


def test_kernels_at_the_papers_shapes_match_fp64(device):
    """The 1.2B model's shapes (hidden 2048, 32 q / 8 KV heads of 64, RoPE over the whole head),
    bf16, default launch configs: the residual add + norm and the per-head Q/K/V norm with RoPE,
    forward and backward, against float64 (fewer tokens on the CPU)."""
    tokens = 512 if device.type == "cuda" else 64
    test_add_rms_norm_matches_fp64(device, BF16, (tokens, 2048), None, False)
    seq, P, hd = tokens // 2, 4, 64
    test_fused_qkv_norm_matches_fp64(device, "head", BF16, (seq, 2, 8, P, hd), True, "bhsd")
    test_fused_qkv_norm_with_rope_matches_fp64(device, BF16, ((seq, 2, 8, P, hd), hd, False, 1.0),
                                               True)


def test_rope_tables_are_built_once_per_freqs_tensor():
    """Every layer of a step passes the same freqs: one table build, reused; a changed or
    another tensor gets new tables."""
    from megatron_hybridnorm.kernels.qkv_norm import rope_tables

    freqs = torch.rand(8, 1, 1, 16)
    first = rope_tables(freqs, 6, 16)
    assert rope_tables(freqs, 6, 16) is first
    assert rope_tables(freqs, 5, 16) is not first  # another length
    again = rope_tables(freqs, 6, 16)
    freqs.mul_(2.0)  # changed in place
    changed = rope_tables(freqs, 6, 16)
    assert changed is not again and not torch.equal(changed[0], again[0])
    other = freqs.clone()
    assert rope_tables(other, 6, 16) is not changed and torch.equal(rope_tables(other, 6, 16)[0],
                                                                    changed[0])


def test_rope_tables_refuse_odd_or_oversized_rotary_dims():
    from megatron_hybridnorm.kernels.qkv_norm import rope_tables

    with pytest.raises(ValueError, match="even and at most head_dim"):
        rope_tables(torch.zeros(4, 1, 1, 80), 4, 64)


def test_full_width_qkv_norm_statistics_span_the_tensor_parallel_group():
    """Two gloo ranks each hold half the KV groups: together they give the one-rank result."""
    from launcher import run_distributed
    from megatron_hybridnorm.kernels.qkv_full_norm import qkv_full_norm

    sq, b, ng, P, hd = 3, 2, 4, 2, 24
    device = "cpu"  # the ranks run on gloo
    mixed = rand(sq, b, ng, (P + 2) * hd, dtype=torch.float32, seed=3, device=device, scale=2.0)
    ws = [rand(n, dtype=torch.float32, seed=4 + i, device=device) * 0.3 + 1.0
          for i, n in enumerate((ng * P * hd, ng * hd, ng * hd))]
    grads = [rand(sq, b, n, hd, dtype=torch.float32, seed=10 + i, device=device)
             for i, n in enumerate((ng * P, ng, ng))]
    one_m = mixed.clone().requires_grad_(True)
    one_w = [w.clone().requires_grad_(True) for w in ws]
    one = qkv_full_norm(one_m, *one_w, heads_per_group=P, head_dim=hd,
                        widths=(ng * P * hd, ng * hd), eps=1e-5)
    torch.autograd.backward(one, grads)
    import dist_cases

    ranks = run_distributed(dist_cases.full_qkv_norm_on_a_slice_of_heads, 2,
                            args=((mixed, ws, grads, ng, P, hd),), timeout=300)
    for i, name in enumerate("qkv"):
        joined = torch.cat([r[0][i] for r in ranks], dim=2)
        assert rel_err(joined, one[i]) < 1e-6, name
        assert rel_err(torch.cat([r[2][i] for r in ranks]), one_w[i].grad) < 1e-6, f"dw{name}"
    assert rel_err(torch.cat([r[1] for r in ranks], dim=2), one_m.grad) < 1e-6


def test_fused_qkv_norm_refuses_head_dim_over_256():
    from megatron_hybridnorm.kernels.qkv_norm import qkv_norm

    w = torch.ones(320)
    with pytest.raises(ValueError, match="head_dim up to 256"):
        qkv_norm(torch.zeros(1, 1, 1, 3 * 320), w, w, w, heads_per_group=1, head_dim=320, eps=1e-5)


@pytest.mark.slow
def test_every_kernel_variant_and_launch_config_compiles_for_hopper(tmp_path):
    """The real Triton compiler (not the interpreter) builds every kernel variant with its
    default launch config, and every candidate config, down to an sm_90 cubin, on any machine:
    the interpreter accepts code the compiler rejects. ptxas's own report of each default build:
    no register spills (dropout's backward at 8192 wide may spill a few bytes), and at least 16
    warps resident per SM, enough loads in flight for a memory-bound kernel."""
    import json
    from pathlib import Path

    from compile_kernels import variants

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(root / "tests" / "compile_kernels.py"), "90",
                          "--json", str(tmp_path / "builds.json")],
                         capture_output=True, text=True, env=env, timeout=1800)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, [ln for ln in lines if ln.startswith("FAIL")] or out.stderr[-3000:]
    builds = json.loads((tmp_path / "builds.json").read_text())
    assert len(builds) == len(list(variants())) > 100
    for b in builds:
        if not b["default"]:
            continue
        dropout_bwd = b["name"].startswith("rms_bwd") and "flags=(True" in b["name"]
        assert b["spill_bytes"] <= (64 if dropout_bwd else 0), b
        assert b["resident_warps"] >= 16, b


def test_dispatch_modes(device, monkeypatch):
    x = torch.zeros(2, device=device)
    monkeypatch.delenv("HYBRIDNORM_KERNELS", raising=False)
    assert kernels.kernel_path(x) == (  # opt-in until they have run on a GPU
        False, "the default; HYBRIDNORM_KERNELS=auto opts in to the kernels on CUDA")
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "auto")
    assert kernels.use_triton(x) == x.is_cuda  # auto: the GPU only
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "torch")
    assert not kernels.use_triton(x)
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "triton")
    assert kernels.use_triton(x)  # on a CPU, the interpreter is on in the tests
    for dtype in (torch.float64, torch.int32):  # never computed in lower precision
        assert kernels.kernel_path(x.to(dtype)) == (False, f"{dtype} (the kernels compute fp32, "
                                                           "bf16 and fp16)")
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="torch, auto, triton"):
        kernels.use_triton(x)


def test_a_cuda_tensor_without_a_working_triton_warns_once_and_takes_torch(monkeypatch):
    from types import SimpleNamespace

    from megatron_hybridnorm.kernels import dispatch

    monkeypatch.setattr(dispatch, "triton_problem", lambda: "ImportError: libcuda broke (test)")
    x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cpu"))
    import warnings

    monkeypatch.delenv("HYBRIDNORM_KERNELS", raising=False)
    with warnings.catch_warnings():  # a CUDA tensor takes torch by default, without a word
        warnings.simplefilter("error")
        assert dispatch.kernel_path(x) == (
            False, "the default; HYBRIDNORM_KERNELS=auto opts in to the kernels on CUDA")
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "auto")
    with pytest.warns(RuntimeWarning, match="unset HYBRIDNORM_KERNELS"):
        assert dispatch.kernel_path(x) == (False, "Triton unavailable (ImportError: libcuda "
                                                  "broke (test))")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not dispatch.use_triton(x)  # said once
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.kernel_path(x) == (False, "HYBRIDNORM_KERNELS=torch")


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_each_layer_says_once_which_path_its_norms_took(megatron_single_rank, monkeypatch,
                                                        capsys, device, mode):
    from helpers import batch, build_gpt, tiny_config
    from megatron_hybridnorm.kernels import report

    monkeypatch.setattr(report, "_shown", set())
    monkeypatch.setenv("HYBRIDNORM_KERNELS", mode)
    tokens, labels, pos = batch(device=device)
    with torch.device(device):
        model = build_gpt(tiny_config(), "hybridnorm_star")
        for _ in range(2):
            model(tokens, pos, None, labels=labels).sum().backward()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "norm kernels" in ln]
    why = "HYBRIDNORM_KERNELS=" + mode
    first = "input, q, k, v, pre_mlp"
    if mode == "triton":
        expected = [
            f"layer 1 (norms: {first}): input_layernorm: triton ({why}); self_attention: "
            f"triton qkv_norm + RoPE ({why}); pre_mlp_layernorm: triton ({why})",
            f"layer 2 (norms: q, k, v, pre_mlp, pre_mlp_is_residual): self_attention: triton "
            f"qkv_norm + RoPE ({why}); pre_mlp_layernorm: triton add + norm ({why})",
        ]
    else:
        heads = "; ".join(f"self_attention.{n}_layernorm: torch ({why})" for n in "qkv")
        expected = [
            f"layer 1 (norms: {first}): input_layernorm: torch ({why}); self_attention: the "
            f"Q/K/V norm modules one by one ({why}); {heads}; pre_mlp_layernorm: torch ({why})",
            f"layer 2 (norms: q, k, v, pre_mlp, pre_mlp_is_residual): self_attention: the Q/K/V "
            f"norm modules one by one ({why}); {heads}; pre_mlp_layernorm: torch add + norm "
            f"({why})",
        ]
    expected.append(f"a norm outside the layers (RMSNorm, width 64): Norm: {mode} ({why})")
    assert lines == [f"megatron-hybridnorm: norm kernels of {e}" for e in expected]


def test_the_kernel_setting_is_read_once_as_the_model_is_built(megatron_single_rank,
                                                               monkeypatch):
    """HYBRIDNORM_KERNELS is read by each norm and attention as it is built: a built model keeps
    its paths whatever the variable says later (here even a value that would be refused)."""
    from helpers import batch, build_gpt, tiny_config
    from megatron_hybridnorm.kernels.report import paths

    tokens, labels, pos = batch()
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "triton")
    forced = build_gpt(tiny_config(), "hybridnorm_star")
    monkeypatch.delenv("HYBRIDNORM_KERNELS")
    default = build_gpt(tiny_config(), "hybridnorm_star")
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "cuda")
    seen = {}
    for name, model in (("forced", forced), ("default", default)):
        model(tokens, pos, None, labels=labels).sum().backward()
        seen[name] = set(paths(model).values())
    assert seen["forced"] and all(p.startswith("triton") for p in seen["forced"]), seen
    assert seen["default"] and all("the default" in p for p in seen["default"]), seen


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
    calls = {"rms_norm": 0, "add_rms_norm": 0, "qkv_norm": 0, "qkv_full_norm": 0}
    qkv_mod = importlib.import_module("megatron_hybridnorm.kernels.qkv_norm")
    full_mod = importlib.import_module("megatron_hybridnorm.kernels.qkv_full_norm")
    for mod, name in ((rms_mod, "rms_norm"), (rms_mod, "add_rms_norm"), (qkv_mod, "qkv_norm"),
                      (full_mod, "qkv_full_norm")):
        original = getattr(mod, name)

        def counted(*a, _f=original, _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)

        monkeypatch.setattr(mod, name, counted)
    import megatron.core.transformer.attention as megatron_attention

    calls["megatron_rope"] = 0
    original_rope = megatron_attention.apply_rotary_pos_emb

    def counted_rope(*a, **k):
        calls["megatron_rope"] += 1
        return original_rope(*a, **k)

    monkeypatch.setattr(megatron_attention, "apply_rotary_pos_emb", counted_rope)
    return calls


# block 0's input norm, Q/K/V and the fused add + FFN norm; Q/K without V; zero-centered
# weights; full-width Q/K/V norms; Post-Norm's two fused add + norms
MODEL_CASES = [("hybridnorm_star", {}, "head"), ("prenorm_qknorm", {}, "head"),
               ("hybridnorm_star", {"layernorm_zero_centered_gamma": True}, "head"),
               ("hybridnorm_star", {}, "full"), ("prenorm_qknorm", {}, "full"),
               ("postnorm", {}, "head")]
# fused residual add + norm calls per forward of the 4-layer model
FUSED_ADDS = {"hybridnorm_star": 3, "prenorm_qknorm": 0, "postnorm": 8}


@pytest.mark.slow
@pytest.mark.parametrize("scheme,config,qkv_norm", MODEL_CASES,
                         ids=[f"{s}{''.join('-' + k for k in c)}-{q}" for s, c, q in MODEL_CASES])
def test_models_match_the_reference_with_the_kernels(megatron_single_rank, forced_kernels,
                                                     device, scheme, config, qkv_norm):
    """The core issue's reference test, with every RMSNorm, the residual adds before norms and
    the Q/K/V norms in Triton."""
    from helpers import build_gpt, randomize_norms, tiny_config
    from test_reference import TOL, compare_to_reference

    torch.manual_seed(0)
    cfg = tiny_config(**config)
    with torch.device(device):
        model = build_gpt(cfg, scheme, **({"qkv_norm": "full"} if qkv_norm == "full" else {}))
    randomize_norms(model)
    if config.get("layernorm_zero_centered_gamma"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layernorm" in n:
                    p.sub_(1.0)
    worst, errs = compare_to_reference(model, scheme, cfg, qkv_norm=qkv_norm)
    assert worst < TOL, {k: v for k, v in errs.items() if v >= TOL}
    assert forced_kernels["rms_norm"] > 0
    assert forced_kernels["add_rms_norm"] == 2 * FUSED_ADDS[scheme]  # 2 forward passes
    qkv_calls = 2 * 4 if scheme != "postnorm" else 0
    assert forced_kernels[{"head": "qkv_norm", "full": "qkv_full_norm"}[qkv_norm]] == qkv_calls
    # RoPE: inside the per-head kernel; Megatron's (q and k, 4 layers, 2 passes) otherwise
    fused_rope = qkv_norm == "head" and scheme != "postnorm"
    assert forced_kernels["megatron_rope"] == (0 if fused_rope else 2 * 4 * 2)


def _logits_and_grads(model, dropout_rng_seed=0):
    from helpers import batch

    tokens, labels, pos = batch(device=next(model.parameters()).device)
    model.zero_grad()
    torch.manual_seed(dropout_rng_seed)
    loss = model(tokens, pos, None, labels=labels)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["hybridnorm", "postnorm"])
def test_fused_residual_add_equals_megatrons_bias_dropout_add(megatron_single_rank,
                                                              forced_kernels, monkeypatch, device,
                                                              scheme):
    """With linear biases (which the fp64 reference model lacks), the fused add + norm against
    Megatron's own bias-dropout-add followed by the norm (the fusion switched off in the layer),
    both in fp32, and both against that Megatron path in float64: every gradient of the fused
    path is within 1e-5 of float64, or no further than twice Megatron's own fp32 error (the
    q/k-norm weight gradients nearly cancel, so both fp32 paths lose digits there). Hidden
    dropout is fused too (its mask is tested in test_add_rms_norm_with_dropout_...); on the torch
    path the handed-over add is bitwise Megatron's bias-dropout-add."""
    from helpers import build_gpt, randomize_norms, tiny_config
    from megatron_hybridnorm.transformer.layer import HybridTransformerLayer

    with torch.device(device):  # the models and what Megatron allocates without a device
        torch.manual_seed(0)
        model = build_gpt(tiny_config(add_bias_linear=True), scheme)
        randomize_norms(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias") and "layernorm" not in n:
                    p.normal_(0.0, 0.5)
        fused_loss, fused = _logits_and_grads(model)
        assert forced_kernels["add_rms_norm"] == {"hybridnorm": 4, "postnorm": 8}[scheme]

        results = {}
        with monkeypatch.context() as m:  # Megatron's add; the Q/K/V and norm kernels stay on
            m.setattr(HybridTransformerLayer, "_fuses_add", lambda self, norm: False)
            for dtype in (torch.float32, torch.float64):
                if dtype == torch.float64:
                    m.setenv("HYBRIDNORM_KERNELS", "torch")
                plain = build_gpt(tiny_config(add_bias_linear=True, params_dtype=dtype), scheme)
                floating = {k: v.to(dtype) for k, v in model.state_dict().items()
                            if torch.is_tensor(v) and v.is_floating_point()}
                plain.load_state_dict({**model.state_dict(), **floating})
                results[dtype] = _logits_and_grads(plain.to(dtype))
        assert forced_kernels["add_rms_norm"] == {"hybridnorm": 4, "postnorm": 8}[scheme]
        (plain_loss, plain), (true_loss, truth) = results[torch.float32], results[torch.float64]
        assert rel_err(fused_loss, true_loss) < 1e-6 and rel_err(plain_loss, true_loss) < 1e-6
        worse = {}
        for n in fused:
            err, megatrons = rel_err(fused[n], truth[n]), rel_err(plain[n], truth[n])
            if err >= max(1e-5, 2 * megatrons):
                worse[n] = (err, megatrons)
        assert not worse, worse
        assert any(n.endswith("linear_proj.bias") for n in fused)  # the bias path was exercised

        # hidden dropout in training: fused too; the same torch seed gives the same loss
        calls = forced_kernels["add_rms_norm"]
        drop = build_gpt(tiny_config(add_bias_linear=True, hidden_dropout=0.2), scheme)
        drop.load_state_dict(model.state_dict())
        drop_loss, _ = _logits_and_grads(drop, dropout_rng_seed=5)
        assert forced_kernels["add_rms_norm"] > calls
        assert torch.equal(_logits_and_grads(drop, dropout_rng_seed=5)[0], drop_loss)
        assert not torch.equal(drop_loss, fused_loss)
        drop.eval()  # no dropout in eval
        assert rel_err(_logits_and_grads(drop)[0], fused_loss) < 1e-6
        # on the torch path the handed-over add draws torch's dropout exactly as Megatron's does
        monkeypatch.setenv("HYBRIDNORM_KERNELS", "torch")
        losses = []
        for fuse in (True, False):
            with monkeypatch.context() as m:
                if not fuse:
                    m.setattr(HybridTransformerLayer, "_fuses_add", lambda self, norm: False)
                net = build_gpt(tiny_config(add_bias_linear=True, hidden_dropout=0.2), scheme)
                net.load_state_dict(model.state_dict())
                losses.append(_logits_and_grads(net, dropout_rng_seed=5)[0])
        assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], fused_loss)


@pytest.mark.slow
def test_tensor_parallel_training_with_the_kernels(monkeypatch):
    """TP=2 + SP against one rank with the kernels forced on every rank: the per-head weights'
    TP gradient handling goes through the fused kernel's weight gradient, the full-width norm's
    statistics are summed over the TP group between the kernel's passes, and the residual add +
    norm runs on sequence-parallel shards."""
    from launcher import Parallel, run_distributed
    from test_tensor_parallel import assert_same_training

    import dist_cases

    monkeypatch.setenv("HYBRIDNORM_KERNELS", "triton")  # inherited by the spawned ranks
    cases = [dict(scheme="hybridnorm_star", sp=True),
             dict(scheme="hybridnorm_star", sp=True, qkv_norm="full")]
    run = dist_cases.train_cases_counting_kernels
    one = run_distributed(run, 1, Parallel(), args=(cases,), timeout=900)[0]
    tp2 = run_distributed(run, 2, Parallel(tp=2), args=(cases,), timeout=900)
    for i, case in enumerate(cases):
        assert_same_training(one[i], [r[i] for r in tp2])
        for result in [one[i]] + [r[i] for r in tp2]:
            calls = result["kernel_calls"]
            assert calls["add_rms_norm"] > 0 and calls["rms_norm"] > 0, calls
            assert calls["qkv_full_norm" if case.get("qkv_norm") == "full" else "qkv_norm"] > 0
