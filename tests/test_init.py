"""SmallInit fills a TransformerConfig with the official code's init."""

import math

import torch

from megatron_hybridnorm import apply_small_init
from helpers import tiny_config


def test_small_init_std_and_truncation():
    cfg = apply_small_init(tiny_config(hidden_size=2048, num_attention_heads=32, num_layers=16,
                                       num_query_groups=8, ffn_hidden_size=8192))
    std = math.sqrt(2 / (5 * 2048))
    assert abs(std - 0.01398) < 1e-5 and cfg.init_method_std == std
    torch.manual_seed(0)
    w = torch.empty(1000, 1000)
    cfg.init_method(w)
    assert abs(w.std().item() / std - 0.9866) < 0.01  # a 3-sigma truncated normal's std
    assert w.abs().max().item() <= 3 * std
    out_std = std / math.sqrt(2 * 16)
    cfg.output_layer_init_method(w)
    assert w.abs().max().item() <= 3 * out_std
    assert abs(w.std().item() / out_std - 0.9866) < 0.01
    e = torch.empty(1000, 1000)
    cfg.embedding_init_method(e)
    assert e.abs().max().item() <= 3 * std


def test_init_truncation_option():
    """--init-truncation: 3 std (the official code), another cut, or 0 for Megatron's plain
    normal (about 0.27% of a million draws then lie beyond 3 std)."""
    std = math.sqrt(2 / (5 * 256))
    torch.manual_seed(0)
    for cut in (3.0, 2.0, 0.0):
        cfg = apply_small_init(tiny_config(hidden_size=256, num_attention_heads=4, num_layers=2),
                               cut)
        for method, s in ((cfg.init_method, std), (cfg.embedding_init_method, std),
                          (cfg.output_layer_init_method, std / 2)):
            w = torch.empty(1000, 1000)
            method(w)
            if cut:
                assert w.abs().max().item() <= cut * s * (1 + 1e-6)
            else:
                assert abs(w.std().item() / s - 1) < 0.01
                assert 2300 < (w.abs() > 3 * s).sum().item() < 3100


def _deepnorm_parts(model):
    """Per layer: (q rows, k rows, v rows of linear_qkv, linear_proj, fc1, fc2) weights."""
    out = []
    for layer in model.decoder.layers:
        att = layer.self_attention
        g, hd = att.num_query_groups_per_partition, att.hidden_size_per_attention_head
        w = att.linear_qkv.weight.detach().view(g, -1, hd, att.linear_qkv.weight.shape[-1])
        out.append((w[:, :-2], w[:, -2], w[:, -1], att.linear_proj.weight.detach(),
                    layer.mlp.linear_fc1.weight.detach(), layer.mlp.linear_fc2.weight.detach()))
    return out


def test_deepnorm_init_scales_value_output_and_ffn_weights_by_beta(megatron_single_rank):
    """DeepNet's beta = (8L)^(-1/4) on the value, output and FFN weights, the query and key
    weights as drawn: the same model as Post-Norm's (same seed), those parts times beta, at
    build and after hybridnorm-train's layout-invariant redraw alike."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from helpers import build_gpt
    from megatron_hybridnorm.harness.layout_init import layout_invariant_init

    cfg = tiny_config(num_layers=4)
    beta = (8 * 4) ** -0.25
    for redraw in (False, True):
        models = []
        for scheme in ("postnorm", "deepnorm"):
            torch.manual_seed(0)
            model_parallel_cuda_manual_seed(0)
            models.append(build_gpt(cfg, scheme))
            if redraw:
                layout_invariant_init(models[-1], cfg, seed=3)
        for post, deep in zip(*map(_deepnorm_parts, models)):
            for i, (a, b) in enumerate(zip(post, deep)):
                factor = 1.0 if i < 2 else beta  # q and k rows as drawn
                assert torch.allclose(b, a * factor, rtol=1e-6, atol=0), (redraw, i)
    assert abs(models[1].decoder.layers[0].residual_scale - (2 * 4) ** 0.25) < 1e-12
