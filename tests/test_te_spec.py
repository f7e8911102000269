"""The Transformer Engine backend's structure (TE classes are megatron-core's stand-ins where TE
is missing); its run time is test_te_runtime.py."""

import pytest
import torch

import megatron_hybridnorm as mh
from megatron_hybridnorm.models.gpt import specs
from megatron_hybridnorm.norms import Norm, PostNorm
from megatron_hybridnorm.norms.te import (
    InterchangeableTENorm,
    TEPostNorm,
    as_post_norm,
    te_norm_linear_keeping_norm,
)
from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoELayer
from helpers import tiny_config
from test_specs import EXPECTED, kind


@pytest.fixture
def te_available(monkeypatch):
    """Build TE specs without TE: the classes are megatron-core's import-time stand-ins."""
    monkeypatch.setattr(specs, "HAVE_TE", True)


def te_slots(layer_spec):
    sub = layer_spec.submodules
    att = sub.self_attention.submodules
    mlp = sub.mlp
    fc = (mlp.keywords["submodules"].linear_fc1, mlp.keywords["submodules"].linear_fc2) \
        if mlp.func is not MoELayer else ("moe",)
    return dict(input=sub.input_layernorm, qkv=att.linear_qkv, core=att.core_attention,
                proj=att.linear_proj, q=kind(att.q_layernorm), k=kind(att.k_layernorm),
                v=kind(att.v_layernorm),
                attn_out=sub.self_attn_output_layernorm, pre_mlp=sub.pre_mlp_layernorm, fc=fc,
                mlp_out=sub.mlp_output_layernorm, post_mlp=sub.post_mlp_layernorm)


def expected_te(local_slots, moe: bool, depth_scaled: bool = False):
    """The TE layout implied by the local one: pre-norms fused into the next linear, except
    LayerNorm Scaling's, which stay this package's norms (TE's fused norm cannot scale)."""
    inp, q, k, v, attn_out, pre, mlp_out, post = local_slots
    te_norm = lambda slot: InterchangeableTENorm if slot is Norm else IdentityOp  # noqa: E731
    if depth_scaled:
        return dict(input=inp, qkv=te_ext.TEColumnParallelLinear, core=te_ext.TEDotProductAttention,
                    proj=te_ext.TERowParallelLinear, q=q, k=k, v=v, attn_out=te_norm(attn_out),
                    pre_mlp=pre, fc=("moe",) if moe else (te_ext.TEColumnParallelLinear,
                                                          te_ext.TERowParallelLinear),
                    mlp_out=te_norm(mlp_out), post_mlp=te_norm(post))
    if inp is PostNorm:  # its output is also the residual: not fused into the QKV linear
        inp_te, qkv = TEPostNorm, te_ext.TEColumnParallelLinear
    else:
        inp_te = IdentityOp
        qkv = (te_ext.TELayerNormColumnParallelLinear if inp is Norm
               else te_ext.TEColumnParallelLinear)
    if pre is PostNorm:
        pre_te = TEPostNorm
    elif pre is Norm:
        pre_te = InterchangeableTENorm if moe else IdentityOp
    else:
        pre_te = IdentityOp
    fc1 = te_ext.TELayerNormColumnParallelLinear if (pre is Norm and not moe) \
        else te_ext.TEColumnParallelLinear
    return dict(
        input=inp_te,
        qkv=qkv,
        core=te_ext.TEDotProductAttention, proj=te_ext.TERowParallelLinear,
        q=q, k=k, v=v, attn_out=te_norm(attn_out), pre_mlp=pre_te,
        fc=("moe",) if moe else (fc1, te_ext.TERowParallelLinear),
        mlp_out=te_norm(mlp_out), post_mlp=te_norm(post),
    )


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_te_spec_places_every_module(te_available, scheme, moe):
    cfg = tiny_config(num_moe_experts=4 if moe else None, moe_router_topk=2 if moe else 2)
    block = mh.get_decoder_block_spec(cfg, scheme, use_transformer_engine=True)
    assert block.layer_norm is InterchangeableTENorm
    scaled = mh.get_scheme(scheme).body.depth_scaled
    for got, local in zip(block.layer_specs, EXPECTED[scheme]):
        assert te_slots(got) == expected_te(local, moe, scaled)
        # TE names already; LayerNorm Scaling's separate norms are stored under them
        assert got.submodules.sharded_state_dict_keys_map == ({} if not scaled else {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            **({} if moe else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})})


def test_te_spec_mixed_dense_and_moe_layers(te_available):
    cfg = tiny_config(num_moe_experts=4, moe_router_topk=2, moe_layer_freq=[0, 1, 0, 1])
    block = mh.get_decoder_block_spec(cfg, "hybridnorm_star", use_transformer_engine=True)
    kinds = ["moe" if te_slots(l)["fc"] == ("moe",) else "dense" for l in block.layer_specs]
    assert kinds == ["dense", "moe", "dense", "moe"]
    # block 0 is Pre-Norm and dense: both norms fused into TE linears
    assert te_slots(block.layer_specs[0])["qkv"] is te_ext.TELayerNormColumnParallelLinear
    assert te_slots(block.layer_specs[0])["pre_mlp"] is IdentityOp


def test_te_full_qkv_norm_and_context_parallel_and_fp8_accepted(te_available):
    cfg = tiny_config(context_parallel_size=2)
    mh.get_decoder_block_spec(cfg, "hybridnorm", use_transformer_engine=True, qkv_norm="full")
    cfg = tiny_config(fp8="hybrid", fp8_recipe="tensorwise")
    mh.get_decoder_block_spec(cfg, "hybridnorm_star", use_transformer_engine=True)


@pytest.mark.parametrize("scheme", ["hybridnorm", "hybridnorm_star", "postnorm", "mixln"])
def test_te_ffn_norm_choices(te_available, scheme):
    """The pre-MLP norm whose output is the residual: a TE norm, this package's fused add + norm,
    or inside the FFN's first linear (which hands its norm output over), under the same
    checkpoint name; every other slot as with the default."""
    cfg = tiny_config()
    default = mh.get_decoder_block_spec(cfg, scheme, use_transformer_engine=True)
    for choice in ("te", "fused_add", "in_linear"):
        block = mh.get_decoder_block_spec(cfg, scheme, use_transformer_engine=True,
                                          te_ffn_norm=choice)
        for got, base in zip(block.layer_specs, default.layer_specs):
            g, b = te_slots(got), te_slots(base)
            if b["pre_mlp"] is not TEPostNorm:  # a Pre-Norm layer: untouched
                assert g == b and got.submodules.sharded_state_dict_keys_map == {}
                continue
            want_fc1 = {"te": b["fc"][0], "fused_add": b["fc"][0],
                        "in_linear": te_norm_linear_keeping_norm()}[choice]
            want_pre = {"te": TEPostNorm, "fused_add": PostNorm, "in_linear": IdentityOp}[choice]
            assert (g["pre_mlp"], g["fc"][0]) == (want_pre, want_fc1)
            assert {k: v for k, v in g.items() if k not in ("pre_mlp", "fc")} == \
                {k: v for k, v in b.items() if k not in ("pre_mlp", "fc")}
            assert got.submodules.sharded_state_dict_keys_map == (
                {"mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."} if choice == "in_linear"
                else {})
    if te_ext.HAVE_TE:  # (without TE, megatron-core's TE classes are mocks)
        assert issubclass(te_norm_linear_keeping_norm(), te_ext.TELayerNormColumnParallelLinear)


def test_te_ffn_norm_in_linear_refuses_moe(te_available):
    cfg = tiny_config(num_moe_experts=4, moe_router_topk=2)
    with pytest.raises(mh.SchemeConfigError, match='use te_ffn_norm="te" or "fused_add"'):
        mh.get_decoder_block_spec(cfg, "hybridnorm", use_transformer_engine=True,
                                  te_ffn_norm="in_linear")
    mh.get_decoder_block_spec(cfg, "hybridnorm", use_transformer_engine=True,
                              te_ffn_norm="fused_add")


@pytest.mark.parametrize("config,match", [
    (dict(recompute_granularity="selective", recompute_modules=["mlp"]), "remove \"mlp\""),
    (dict(recompute_granularity="selective", recompute_modules=["mlp"], fp8="hybrid"),
     "remove \"mlp\""),  # TE's checkpoint under FP8: the same recompute
    (dict(mlp_chunks_for_training=2), "mlp_chunks_for_training > 1"),
])
def test_in_linear_ffn_norm_refuses_what_would_lose_the_residual_gradient(te_available, config,
                                                                           match):
    """The FFN input n that TENormLinearKeepingNorm keeps is the residual: under MLP recompute
    it would carry no graph, with chunked MLPs it would be the last chunk's only."""
    if not all(hasattr(tiny_config(), k) for k in config):
        pytest.skip("this megatron-core has no mlp_chunks_for_training")
    for scheme in ("hybridnorm", "hybridnorm_star", "postnorm"):
        with pytest.raises(mh.SchemeConfigError, match=match):
            mh.get_decoder_block_spec(tiny_config(**config), scheme,
                                      use_transformer_engine=True, te_ffn_norm="in_linear")
        for other in ("te", "fused_add"):  # these keep the norm a module of its own
            mh.get_decoder_block_spec(tiny_config(**config), scheme,
                                      use_transformer_engine=True, te_ffn_norm=other)


def test_fp8_on_the_local_backend_is_refused():
    with pytest.raises(mh.SchemeConfigError, match="use_transformer_engine=True"):
        mh.get_decoder_block_spec(tiny_config(fp8="hybrid"), "hybridnorm")


@pytest.mark.skipif(te_ext.HAVE_TE, reason="Transformer Engine is installed")
def test_te_backend_without_te_is_a_clear_error():
    with pytest.raises(mh.SchemeConfigError, match=r"pip install 'megatron-hybridnorm\[te\]'"):
        mh.get_decoder_block_spec(tiny_config(), "hybridnorm", use_transformer_engine=True)
    with pytest.raises(mh.SchemeConfigError, match="needs Transformer Engine"):
        mh.get_layer_spec("prenorm", use_transformer_engine=True)


def test_as_post_norm_keeps_parameters_and_returns_output_as_residual():
    norm = torch.nn.RMSNorm(8)
    weight = norm.weight
    post = as_post_norm(norm)
    out, residual = post(torch.randn(3, 8))
    assert out is residual and post.weight is weight and post.returns_residual
    assert [n for n, _ in post.named_parameters()] == ["weight"]
    assert isinstance(post, torch.nn.RMSNorm)


def test_dyt_on_transformer_engine_is_refused_naming_the_local_backend(te_available):
    """TE has no DyT module, and its fused norm-linears cannot take one."""
    with pytest.raises(mh.SchemeConfigError, match=r"DyT.*--transformer-impl local"):
        mh.get_decoder_block_spec(tiny_config(normalization="DyT"), "periln",
                                  use_transformer_engine=True)
