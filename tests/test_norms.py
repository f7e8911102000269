"""Norm modules: fp32 math whatever the input dtype, and their parallel markings."""

import pytest
import torch

from megatron_hybridnorm.norms import FullWidthNorm, HeadNorm, Norm, PostNorm
from helpers import tiny_config


def ref_rms(x, w, eps=1e-5):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_is_computed_in_fp32(dtype):
    n = Norm(config=tiny_config(), hidden_size=64, eps=1e-5)
    with torch.no_grad():
        n.weight.uniform_(0.5, 1.5)
    x = (torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0)) * 300).to(dtype)
    y = n(x)  # 300^2 * 64 overflows fp16 if squared in fp16
    assert y.dtype == dtype and torch.isfinite(y).all()
    # the fp64 result rounded to the output dtype: one rounding step for 16-bit types (a few
    # ulps of fp32 accumulation for fp32)
    expected = ref_rms(x, n.weight.detach()).to(dtype).float()
    ulps = 8 if dtype == torch.float32 else 1
    assert (y.float() - expected).abs().max() <= ulps * torch.finfo(dtype).eps * expected.abs().max()


def test_post_norm_returns_output_as_residual():
    n = PostNorm(config=tiny_config(), hidden_size=64, eps=1e-5)
    out, residual = n(torch.randn(3, 2, 64))
    assert out is residual
    assert PostNorm.returns_residual is True


def test_head_norm_shares_one_weight_across_heads():
    n = HeadNorm(config=tiny_config(), hidden_size=16, eps=1e-5)
    with torch.no_grad():
        n.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 2, 3, 16)
    for h in range(3):
        assert torch.allclose(n(x)[:, :, h], ref_rms(x[:, :, h], n.weight.detach()).float(), atol=1e-6)


def test_head_norm_scales_local_grad_by_tp_for_megatrons_average():
    n = HeadNorm(config=tiny_config(tensor_model_parallel_size=2), hidden_size=16, eps=1e-5)
    x = torch.randn(4, 2, 3, 16)
    n(x).sum().backward()
    g2 = n.weight.grad.clone()
    m = HeadNorm(config=tiny_config(), hidden_size=16, eps=1e-5)
    m(x).sum().backward()
    assert torch.equal(g2, 2 * m.weight.grad)


def test_full_width_norm_at_tp1_normalizes_across_heads():
    n = FullWidthNorm(config=tiny_config(), hidden_size=16, eps=1e-5, spans="query")
    assert n.weight.shape == (64,)
    with torch.no_grad():
        n.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 2, 4, 16)
    expected = ref_rms(x.flatten(2), n.weight.detach()).view_as(x).float()
    assert torch.allclose(n(x), expected, atol=1e-6)


def test_full_width_norm_refuses_uneven_heads():
    with pytest.raises(ValueError, match='qkv_norm="head"'):
        FullWidthNorm(config=tiny_config(tensor_model_parallel_size=4, num_query_groups=2),
                      hidden_size=16, eps=1e-5, spans="kv")


def test_unsupported_normalization_is_named():
    cfg = tiny_config()
    cfg.normalization = "L2Norm"
    with pytest.raises(ValueError, match="RMSNorm"):
        Norm(config=cfg, hidden_size=64, eps=1e-5)


def _apex_and_cuda():
    from megatron_hybridnorm.norms.functional import HAVE_APEX

    return HAVE_APEX and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _apex_and_cuda(), reason="needs Apex and a CUDA device")
@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_apex_path_matches_torch_path(kind, zero_centered):
    from megatron_hybridnorm.norms.functional import normalize

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 4, 256, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.rand(256, device="cuda", generator=g) + 0.5).requires_grad_(True)
    b = torch.randn(256, device="cuda", generator=g).requires_grad_(True)
    grads = []
    for impl in ("apex", "torch"):
        y = normalize(x, w, b if kind == "LayerNorm" else None, 1e-5, kind, zero_centered, impl)
        y.float().square().sum().backward()
        grads.append((y.detach().float(), x.grad.float().clone(), w.grad.clone()))
        x.grad = w.grad = b.grad = None
    for a, t in zip(*grads):
        assert ((a - t).norm() / t.norm()).item() < 1e-2


@pytest.mark.slow
def test_full_width_norm_sums_over_the_models_tp_group_not_the_global_one():
    """It all-reduced over megatron-core's global TP group, not the model's pg_collection.tp."""
    import dist_cases
    from launcher import Parallel, run_distributed

    torch.manual_seed(0)
    x, grad = torch.randn(3, 2, 4, 16), torch.randn(3, 2, 4, 16)
    w = 1.0 + 0.3 * torch.randn(64)
    ranks = run_distributed(dist_cases.full_width_norm_on_the_models_tp_group, 2,
                            Parallel(tp=1), args=((x, w, grad),), timeout=300)
    xf = x.reshape(3, 2, 64)  # one row of all heads, as at TP=1
    wr = w.clone().requires_grad_(True)
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * wr).reshape(3, 2, 4, 16)
    ref.backward(grad)
    out = torch.cat([r[0] for r in ranks], dim=2)
    assert (out - ref).abs().max() < 1e-5
    assert (torch.cat([r[1] for r in ranks]) - wr.grad).abs().max() < 1e-4


def test_head_norms_and_layer_norms_take_the_models_tp_group(megatron_single_rank):
    from helpers import build_gpt, tiny_config

    model = build_gpt(tiny_config(), "hybridnorm_star", qkv_norm="full")
    layer = model.decoder.layers[0]
    tp = layer.pg_collection.tp
    assert layer.self_attention.q_layernorm.tp_group is tp
    assert layer.self_attention.v_layernorm.tp_group is tp
    assert layer.input_layernorm.tp_group is tp


def test_dyt_parameters_and_their_tensor_parallel_marks():
    """DyT: gamma, beta and one alpha at the paper's 0.5. In a residual-stream norm all three
    are marked sequence-parallel (summed over TP under SP, as a norm weight is); in a per-head
    norm all are summed over TP; in a full-width norm gamma and beta are TP-sharded like the
    heads and the one alpha is replicated and summed over TP."""
    cfg = tiny_config(normalization="DyT", tensor_model_parallel_size=2, sequence_parallel=True)
    n = Norm(config=cfg, hidden_size=64)
    assert n.alpha.shape == (1,) and float(n.alpha) == 0.5 and n.bias is not None
    assert all(p.sequence_parallel for p in (n.weight, n.bias, n.alpha))
    h = HeadNorm(config=cfg, hidden_size=16)
    assert all(p.average_gradients_across_tp_domain for p in (h.weight, h.bias, h.alpha))
    f = FullWidthNorm(config=cfg, hidden_size=16, spans="query")
    assert f.weight.tensor_model_parallel and f.bias.tensor_model_parallel
    assert not getattr(f.alpha, "tensor_model_parallel", False)
    assert f.alpha.average_gradients_across_tp_domain
    x = torch.randn(3, 2, 2, 16)
    assert torch.allclose(f(x), torch.tanh(0.5 * x))  # gamma 1, beta 0: elementwise, no stats
