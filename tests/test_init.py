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
