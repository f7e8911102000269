"""Spec structure, parameter names, pipeline placement and configuration errors."""

import pytest
import torch

import megatron_hybridnorm as mh
from megatron_hybridnorm.norms import FullWidthNorm, HeadNorm, Norm, PostNorm
from megatron.core.transformer.identity_op import IdentityOp
from helpers import build_gpt, tiny_config

I, H, N, P = IdentityOp, HeadNorm, Norm, PostNorm
# slot classes: input, q, k, v, attention output, pre_mlp, FFN output, post_mlp -- written out
# per scheme from the equations
PRE = (N, None, None, None, I, N, I, I)
POST = (I, None, None, None, I, P, I, N)
PRE_QK = (N, H, H, None, I, N, I, I)
HYB = (I, H, H, H, I, P, I, I)
HYB_FIRST = (N, H, H, H, I, N, I, I)
POST_OFFICIAL = (P, None, None, None, I, P, I, I)  # input and pre-MLP norms are also the residuals
PERI = (N, None, None, None, N, N, N, I)  # a norm on each sublayer's input and output
F = FullWidthNorm
REORDERED = (I, F, F, None, N, I, N, I)  # OLMo 2: output norms only, Q/K over all heads
EXPECTED = {
    "prenorm": [PRE] * 4,
    "postnorm": [POST] * 4,
    "postnorm_official": [POST_OFFICIAL] * 4,
    "prenorm_qknorm": [PRE_QK] * 4,
    "mixln": [POST, PRE, PRE, PRE],
    "mixln_official": [POST_OFFICIAL, PRE, PRE, PRE],
    "hybridnorm": [HYB] * 4,
    "hybridnorm_star": [HYB_FIRST, HYB, HYB, HYB],
    "periln": [PERI] * 4,
    "olmo2": [REORDERED] * 4,
    "prenorm_lns": [PRE] * 4,  # the same slots; the layer scales them (test_reference)
    "deepnorm": [POST] * 4,  # the same slots; the layer scales the residual (test_reference)
}


def kind(builder):
    """A slot's class (FullWidthNorm comes as a partial)."""
    return getattr(builder, "func", builder)


def slots(layer_spec):
    sub = layer_spec.submodules
    att = sub.self_attention.submodules
    return (sub.input_layernorm, kind(att.q_layernorm), kind(att.k_layernorm),
            kind(att.v_layernorm), sub.self_attn_output_layernorm, sub.pre_mlp_layernorm,
            sub.mlp_output_layernorm, sub.post_mlp_layernorm)


def test_scheme_names():
    assert mh.SCHEMES == ("prenorm", "postnorm", "postnorm_official", "prenorm_qknorm", "mixln",
                          "mixln_official", "hybridnorm", "hybridnorm_star", "periln", "olmo2",
                          "prenorm_lns", "deepnorm")


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_block_spec_places_every_norm(scheme):
    block = mh.get_decoder_block_spec(tiny_config(), scheme)
    assert [slots(s) for s in block.layer_specs] == EXPECTED[scheme]
    assert block.layer_norm is Norm


def test_full_qkv_norm_spec():
    block = mh.get_decoder_block_spec(tiny_config(), "hybridnorm", qkv_norm="full")
    att = block.layer_specs[0].submodules.self_attention.submodules
    q, k, v = att.q_layernorm, att.k_layernorm, att.v_layernorm
    assert q.func is FullWidthNorm and q.keywords == {"spans": "query"}
    assert k.func is v.func is FullWidthNorm and k.keywords == v.keywords == {"spans": "kv"}


def test_get_layer_spec_builds_the_schemes_own_option_defaults():
    """One default per option: without qkv_norm, a scheme's own span (olmo2's is "full"), the
    same as get_decoder_block_spec builds; a bare layout takes the table's ("head")."""
    def q_norm(spec):
        return spec.submodules.self_attention.submodules.q_layernorm

    assert q_norm(mh.get_layer_spec("olmo2")).func is FullWidthNorm
    assert q_norm(mh.get_layer_spec("olmo2", qkv_norm="head")) is HeadNorm
    assert q_norm(mh.get_layer_spec(mh.get_scheme("olmo2"))).func is FullWidthNorm
    assert q_norm(mh.get_layer_spec("hybridnorm")) is HeadNorm
    assert q_norm(mh.get_layer_spec(mh.get_scheme("olmo2").body)) is HeadNorm
    block = mh.get_decoder_block_spec(tiny_config(), "olmo2")
    assert q_norm(block.layer_specs[0]).func is FullWidthNorm


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_the_spec_builders_take_a_name_or_the_scheme(scheme):
    """Resolved once at the top: a Scheme builds the spec its name builds."""
    s = mh.get_scheme(scheme)
    assert repr(mh.get_layer_spec(s)) == repr(mh.get_layer_spec(scheme))
    assert repr(mh.get_decoder_block_spec(tiny_config(), s)) == \
        repr(mh.get_decoder_block_spec(tiny_config(), scheme))


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_the_block_spec_changes_the_config_only_as_its_docstring_says(scheme):
    """get_decoder_block_spec sets config.hetereogenous_dist_checkpoint where the scheme's
    layers differ (HybridNorm*, Mix-LN), and changes nothing else of the caller's config."""
    config = tiny_config()
    before = dict(vars(config))
    mh.get_decoder_block_spec(config, scheme)
    changed = {k for k, v in vars(config).items() if before.get(k, object()) is not v
               and before.get(k, object()) != v}
    differ = len(set(mh.get_scheme(scheme).layouts(config.num_layers))) > 1
    assert changed == ({"hetereogenous_dist_checkpoint"} if differ else set())
    assert config.hetereogenous_dist_checkpoint is (True if differ else before[
        "hetereogenous_dist_checkpoint"])


def test_get_layer_spec_first_block():
    assert slots(mh.get_layer_spec("hybridnorm_star", first_block=True)) == HYB_FIRST
    assert slots(mh.get_layer_spec("hybridnorm_star")) == HYB
    assert slots(mh.get_layer_spec("mixln", first_block=True)) == POST
    assert slots(mh.get_layer_spec("hybridnorm", first_block=True)) == HYB
    assert slots(mh.get_layer_spec(mh.schemes.POST_NORM)) == POST


NORM_PARAMS = {
    "hybridnorm_star": {
        0: {"input_layernorm", "self_attention.q_layernorm", "self_attention.k_layernorm",
            "self_attention.v_layernorm", "pre_mlp_layernorm"},
        1: {"self_attention.q_layernorm", "self_attention.k_layernorm",
            "self_attention.v_layernorm", "pre_mlp_layernorm"},
    },
    "postnorm": {0: {"pre_mlp_layernorm", "post_mlp_layernorm"}},
    "prenorm": {0: {"input_layernorm", "pre_mlp_layernorm"}},
}


@pytest.mark.parametrize("scheme", NORM_PARAMS)
def test_parameter_names(megatron_single_rank, scheme):
    model = build_gpt(tiny_config(), scheme)
    names = [n for n, _ in model.named_parameters()]
    for layer, expected in NORM_PARAMS[scheme].items():
        found = {n.split(f"decoder.layers.{layer}.")[1].rsplit(".", 1)[0]
                 for n in names if n.startswith(f"decoder.layers.{layer}.") and "norm" in n}
        assert found == expected
    assert "decoder.final_layernorm.weight" in names
    head = model.decoder.layers[-1].self_attention
    if scheme == "hybridnorm_star":  # one weight of width head_dim, shared by all heads
        assert head.q_layernorm.weight.shape == head.v_layernorm.weight.shape == (16,)


def test_layernorm_has_bias_rmsnorm_has_not(megatron_single_rank):
    names = [n for n, _ in build_gpt(tiny_config(normalization="LayerNorm"), "hybridnorm").named_parameters()]
    assert "decoder.layers.0.self_attention.v_layernorm.bias" in names
    names = [n for n, _ in build_gpt(tiny_config(), "hybridnorm").named_parameters()]
    assert not any(n.endswith("layernorm.bias") for n in names)


def test_sequence_parallel_marks_residual_norms_only():
    cfg = tiny_config(tensor_model_parallel_size=2, sequence_parallel=True)
    n = Norm(config=cfg, hidden_size=64, eps=1e-5)
    h = HeadNorm(config=cfg, hidden_size=16, eps=1e-5)
    assert n.weight.sequence_parallel is True
    assert not getattr(h.weight, "sequence_parallel", False)
    assert h.weight.average_gradients_across_tp_domain is True


def _dist_keys(model):
    return {v.key for v in model.sharded_state_dict().values() if hasattr(v, "key")}


def test_dist_checkpoint_keys_match_megatron_te_names(megatron_single_rank):
    """Like Megatron's local spec: pre-norms are stored under the TE fused-linear names, and
    uniform layers are stacked into one tensor per name."""
    keys = _dist_keys(build_gpt(tiny_config(), "prenorm"))
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys


def test_dist_checkpoint_keys_of_heterogeneous_layers_are_per_layer(megatron_single_rank):
    """HybridNorm*'s block 0 holds an input norm the others lack: stacking would leave the
    tensor for layers 1.. uncovered, so every layer gets its own keys."""
    keys = _dist_keys(build_gpt(tiny_config(), "hybridnorm_star"))
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in keys  # PostNorm: TE cannot fuse it
    assert "decoder.layers.3.self_attention.v_layernorm.weight" in keys
    assert not any(k.startswith("decoder.layers.self_attention") for k in keys)


def pp_config(**kw):
    base = dict(num_layers=8, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    base.update(kw)
    return tiny_config(**base)


def first_blocks(config, scheme, stages):
    """{(pp_rank, vp_stage): [True where the layer uses the scheme's first-block layout]}"""
    s = mh.get_scheme(scheme)
    out = {}
    for pp, vp in stages:
        block = mh.get_decoder_block_spec(config, scheme, pp_rank=pp, vp_stage=vp)
        out[(pp, vp)] = [slots(l) == slots(mh.get_layer_spec(s.head)) for l in block.layer_specs]
    return out


def test_hybridnorm_star_first_block_is_global_layer_0_with_pp_and_vpp():
    cfg = pp_config(virtual_pipeline_model_parallel_size=2)
    got = first_blocks(cfg, "hybridnorm_star", [(0, 0), (1, 0), (0, 1), (1, 1)])
    assert got == {(0, 0): [True, False], (1, 0): [False, False],
                   (0, 1): [False, False], (1, 1): [False, False]}


def test_mixln_post_norm_layers_are_global_not_per_stage():
    got = first_blocks(pp_config(), "mixln", [(0, None), (1, None)])
    assert got == {(0, None): [True, True, False, False], (1, None): [False] * 4}


def test_uneven_split_accounting_for_embedding():
    cfg = pp_config(num_layers=7, account_for_embedding_in_pipeline_split=True)
    got = first_blocks(cfg, "hybridnorm_star", [(0, None), (1, None)])
    assert got == {(0, None): [True, False, False], (1, None): [False] * 4}


def test_uneven_split_first_stage_size():
    cfg = pp_config(num_layers_in_first_pipeline_stage=3)
    got = first_blocks(cfg, "mixln", [(0, None), (1, None)])  # floor(0.25 * 8) = 2 Post-Norm
    assert got == {(0, None): [True, True, False], (1, None): [False] * 5}


ERRORS = [
    (dict(), "nonsense", {}, "unknown norm scheme 'nonsense'"),
    (dict(), "hybridnorm", {"qkv_norm": "sideways"}, "qkv_norm must be one of"),
    (dict(), "prenorm", {"qkv_norm": "full"}, "takes no options"),
    (dict(), "hybridnorm", {"mixln_fraction": 0.5},
     "takes the options ['qkv_norm', 'te_ffn_norm']"),
    (dict(), "prenorm_qknorm", {"te_ffn_norm": "fused_add"}, "takes the options ['qkv_norm']"),
    (dict(), "hybridnorm", {"te_ffn_norm": "fused"}, "te_ffn_norm must be one of"),
    (dict(), "hybridnorm", {"te_ffn_norm": "fused_add"}, "use_transformer_engine=True"),
    (dict(), "mixln", {"mixln_fraction": 1.5}, "must lie in [0, 1]"),
    (dict(qk_l2_norm=True), "hybridnorm", {}, "unset it"),
    (dict(qk_layernorm=True), "prenorm", {}, "use scheme 'prenorm_qknorm'"),
    (dict(multi_latent_attention=True), "hybridnorm", {}, "multi_latent_attention=False"),
    (dict(recompute_granularity="selective", recompute_modules=["layernorm"]), "hybridnorm", {},
     'remove "layernorm" from recompute_modules'),
    (dict(recompute_granularity="selective", recompute_modules=["layernorm"]), "postnorm", {},
     'remove "layernorm" from recompute_modules'),
    (dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
     "postnorm_official", {}, 'remove "layernorm" from recompute_modules'),
    (dict(tensor_model_parallel_size=4, num_query_groups=2), "hybridnorm", {"qkv_norm": "full"},
     'qkv_norm="head"'),
    (dict(context_parallel_size=2), "hybridnorm", {}, "use_transformer_engine=True"),
    (dict(window_size=(4, 0)), "prenorm", {}, "use_transformer_engine=True"),
    (dict(memory_efficient_layer_norm=True), "hybridnorm", {}, "unset it"),
]


@pytest.mark.parametrize("overrides,scheme,options,message", ERRORS)
def test_bad_config_fails_at_spec_build(overrides, scheme, options, message):
    with pytest.raises(ValueError) as err:
        mh.get_decoder_block_spec(tiny_config(**overrides), scheme, **options)
    assert message in str(err.value)


def test_fused_single_qkv_rope_rejected_with_qkv_norms():
    cfg = tiny_config()
    cfg.fused_single_qkv_rope = True  # (TransformerConfig itself wants TE to set it)
    with pytest.raises(mh.SchemeConfigError, match="unset fused_single_qkv_rope"):
        mh.get_decoder_block_spec(cfg, "hybridnorm_star")
    mh.get_decoder_block_spec(cfg, "prenorm")  # no Q/K/V norms: fine


def test_accepted_configs():
    # recompute of the pre-norm layers' norms is fine where no norm output is a residual
    mh.get_decoder_block_spec(
        tiny_config(recompute_granularity="selective", recompute_modules=["layernorm"]), "prenorm"
    )
    # Megatron-LM sets persist_layer_norm by default; it only picks an Apex kernel
    mh.get_decoder_block_spec(tiny_config(persist_layer_norm=True), "hybridnorm")
    mh.get_decoder_block_spec(tiny_config(qk_layernorm=True), "hybridnorm")
    mh.get_decoder_block_spec(tiny_config(tensor_model_parallel_size=4), "hybridnorm")


@pytest.mark.parametrize("overrides,message", [
    (dict(tensor_model_parallel_size=3), "must be a multiple of tensor_model_parallel_size"),
    (dict(sequence_parallel=True), "sequence parallelism without tensor parallelism"),
    (dict(tensor_model_parallel_size=4, num_query_groups=2), 'qkv_norm="head"'),
])
def test_invalid_parallel_layouts_fail_before_any_collective(overrides, message):
    """No process group exists here: the errors come from building the config and the spec."""
    import torch.distributed

    assert not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1
    with pytest.raises(ValueError, match=message):
        mh.get_decoder_block_spec(tiny_config(**overrides), "hybridnorm", qkv_norm="full")


@pytest.mark.parametrize("config,match", [
    (dict(transformer_impl="inference_optimized"), "inference_optimized"),
])
def test_backends_the_specs_do_not_build_are_refused(config, match):
    """They were ignored: inference_optimized built the local modules."""
    for scheme in mh.SCHEMES:
        with pytest.raises(mh.SchemeConfigError, match=match):
            mh.get_decoder_block_spec(tiny_config(**config), scheme)


def test_kitchen_is_refused():
    cfg = tiny_config()
    cfg.use_kitchen = True  # its config check asks for the Kitchen package; the flag suffices
    with pytest.raises(mh.SchemeConfigError, match="use_kitchen"):
        mh.get_decoder_block_spec(cfg, "hybridnorm")
