"""One answer to "is this a norm parameter?" (norms/names.py), used by the layout-invariant init,
the check's norm randomization and replica check, its gradient groups and the inspector."""

import pytest
import torch

import megatron_hybridnorm as mh
from helpers import build_gpt, randomize_norms, tiny_config
from megatron_hybridnorm import compat
from megatron_hybridnorm.check.compare import group_of
from megatron_hybridnorm.harness.layout_init import layout_invariant_init
from megatron_hybridnorm.norms.names import is_head_norm_parameter, is_norm_parameter

NORMS = [
    "decoder.layers.0.input_layernorm.weight", "decoder.layers.3.pre_mlp_layernorm.bias",
    "decoder.layers.1.post_mlp_layernorm.weight", "decoder.final_layernorm.weight",
    "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.v_layernorm.weight",
    # Transformer Engine's norm fused into LayerNormLinear
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.2.mlp.linear_fc1.layer_norm_bias",
    # HybridModel's final norm, a Mamba mixer's norm
    "decoder.final_norm.weight", "decoder.layers.4.mixer.norm.weight",
]
OTHERS = [
    "embedding.word_embeddings.weight", "output_layer.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_proj.bias", "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.router.weight", "decoder.layers.0.mlp.experts.linear_fc1.weight3",
    "decoder.layers.4.mixer.in_proj.weight", "decoder.layers.4.mixer.A_log",
]


def test_norm_parameter_names():
    assert all(is_norm_parameter(n) for n in NORMS), [n for n in NORMS if not is_norm_parameter(n)]
    assert not any(is_norm_parameter(n) for n in OTHERS), [n for n in OTHERS
                                                          if is_norm_parameter(n)]
    assert [n for n in NORMS if is_head_norm_parameter(n)] == NORMS[4:6]
    assert group_of(NORMS[6]) == "residual-stream norm weights"
    assert group_of(NORMS[4]) == "Q/K/V norm weights"


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_every_norm_of_a_built_model_is_named_a_norm(megatron_single_rank, scheme):
    model = build_gpt(tiny_config(), scheme)
    for name, module in model.named_modules():
        if isinstance(module, (mh.norms.Norm, mh.norms.HeadNorm, mh.norms.FullWidthNorm)):
            for pname, _ in module.named_parameters(prefix=name):
                assert is_norm_parameter(pname), pname
    for name, _ in model.named_parameters():
        if "linear" in name or "embedding" in name or name.startswith("output_layer."):
            assert not is_norm_parameter(name), name


def with_te_fused_norm(model):
    """A local model with a norm weight named as Transformer Engine's LayerNormLinear names it."""
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    qkv.register_parameter("layer_norm_weight",
                           torch.nn.Parameter(torch.ones(model.config.hidden_size)))
    return qkv.layer_norm_weight


def test_the_layout_init_leaves_te_fused_norm_weights_as_built(megatron_single_rank):
    """The check's init redrew TE's fused norm weights at N(0, 0.02): it tested string
    'layernorm' in the name, which 'layer_norm_weight' does not contain."""
    model = build_gpt(tiny_config(), "prenorm")
    w = with_te_fused_norm(model)
    layout_invariant_init(model, model.config, seed=0)
    assert torch.equal(w, torch.ones_like(w))
    randomize_norms(model)  # and the check's norm randomization reaches them
    assert not torch.equal(w, torch.ones_like(w))


@pytest.mark.skipif(not compat.HAVE_HYBRID_MODEL, reason="this megatron-core has no HybridModel")
def test_the_layout_init_leaves_the_hybrid_final_norm_as_built(megatron_single_rank):
    """HybridModel's final norm is decoder.final_norm: no 'layernorm' in its name either."""
    from megatron_hybridnorm.check.builders import build_hybrid

    model = build_hybrid(tiny_config(num_layers=4), "hybridnorm", "*-*-")
    layout_invariant_init(model, model.config, seed=0)
    w = model.decoder.final_norm.weight
    assert torch.equal(w, torch.ones_like(w))
