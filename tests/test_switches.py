"""The switches a large run flips, one rank: each is supported (the same result as without it)
or refused when the spec is built, with a message that names the fix."""

import pytest
import torch

import megatron_hybridnorm as mh
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron_hybridnorm import compat
from megatron_hybridnorm.models.gpt import entrypoints
from megatron_hybridnorm.schemes import get_scheme
from helpers import batch, build_gpt, randomize_norms, rel_err, tiny_config

MOE_OVERLAP = dict(num_moe_experts=4, moe_router_topk=2, expert_model_parallel_size=2,
                   overlap_moe_expert_parallel_comm=True, moe_token_dispatcher_type="alltoall",
                   bf16=True, params_dtype=torch.bfloat16)


@pytest.mark.parametrize("scheme", ["hybridnorm", "hybridnorm_star", "postnorm", "mixln",
                                    "postnorm_official", "periln", "olmo2", "deepnorm"])
def test_moe_expert_parallel_overlap_is_refused_where_it_would_skip_the_norms(scheme):
    """megatron-core's fine-grained MoE callables call the pre-MLP norm and the residual adds
    directly; HybridNorm's post-normed residual and Post-Norm's layer-output norm would be
    lost."""
    with pytest.raises(mh.SchemeConfigError, match="--overlap-moe-expert-parallel-comm"):
        mh.get_decoder_block_spec(tiny_config(**MOE_OVERLAP), scheme)


@pytest.mark.parametrize("scheme", ["prenorm", "prenorm_qknorm", "prenorm_lns"])
def test_moe_expert_parallel_overlap_is_left_to_megatron_for_pre_norm(scheme):
    assert mh.get_decoder_block_spec(tiny_config(**MOE_OVERLAP), scheme).layer_specs


@pytest.mark.parametrize("scheme", ["hybridnorm_star", "prenorm"])
def test_multi_token_prediction_is_refused_by_the_megatron_lm_entry_points(scheme):
    """Megatron-LM 0.19 builds MTP layers from its default spec, whatever --spec says."""
    with pytest.raises(mh.SchemeConfigError, match="unset --mtp-num-layers"):
        getattr(entrypoints, scheme)(tiny_config(transformer_impl="local", mtp_num_layers=1))


def test_dyt_before_megatron_core_0_19_is_refused_by_the_megatron_lm_entry_points(monkeypatch):
    """Before 0.19 Megatron-LM adds its own final norm around a --spec layer, with no DyT."""
    monkeypatch.setattr(entrypoints, "SPEC_CALLABLES_ARE_CALLED", False)
    with pytest.raises(mh.SchemeConfigError, match="DyT.*0.19 or later"):
        entrypoints.check_megatron_lm_config(get_scheme("periln"), tiny_config(normalization="DyT"))


@pytest.mark.skipif("cuda_graph_modules" not in TransformerConfig.__dataclass_fields__,
                    reason="this megatron-core's TransformerConfig has no cuda_graph_modules")
@pytest.mark.parametrize("impl,modules,fused", [
    ("none", [], True), ("full_iteration", [], True),
    ("transformer_engine", ["attn"], False), ("transformer_engine", [], False),
])
def test_cuda_graphs_keep_the_residual_add_inside_one_graph(megatron_single_rank, impl, modules,
                                                            fused):
    """Per-layer CUDA graphs may capture attention and MLP apart: the attention's residual add
    then stays Megatron's instead of waiting for the MLP's norm. The result is the same."""
    torch.manual_seed(0)
    plain = build_gpt(tiny_config(), "hybridnorm")
    randomize_norms(plain)
    graphed = build_gpt(tiny_config(cuda_graph_impl=impl, cuda_graph_modules=modules),
                        "hybridnorm")
    graphed.load_state_dict(plain.state_dict())
    # before 0.20 the hand-over replaces self_attn_bda; from 0.20 a hook reads the flag
    handed_over = [layer._hands_over_attn_add and (
        compat.LAYER_HOOKS or layer.self_attn_bda.__name__ == "_hand_over_bda")
        for layer in graphed.decoder.layers]
    assert handed_over == [fused] * len(handed_over)
    tokens, labels, pos = batch()
    with torch.no_grad():
        assert rel_err(graphed(tokens, pos, None, labels=labels),
                       plain(tokens, pos, None, labels=labels)) < 1e-6


def test_te_activation_func_is_honoured_on_te_and_refused_on_local(monkeypatch):
    from megatron_hybridnorm.models.gpt import specs

    cfg = tiny_config(use_te_activation_func=True, bias_activation_fusion=False)
    with pytest.raises(mh.SchemeConfigError, match="use_transformer_engine=True"):
        mh.get_decoder_block_spec(cfg, "hybridnorm")
    monkeypatch.setattr(specs, "HAVE_TE", True)  # megatron-core's stand-ins for TE's classes
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    for moe in (False, True):
        c = tiny_config(use_te_activation_func=True, bias_activation_fusion=False,
                        num_moe_experts=4 if moe else None, moe_router_topk=2)
        spec = mh.get_decoder_block_spec(c, "hybridnorm", use_transformer_engine=True)
        mlp = spec.layer_specs[0].submodules.mlp
        submodules = mlp.keywords["submodules"]
        if moe:
            submodules = submodules.experts.keywords["submodules"]
        assert submodules.activation_func is TESpecProvider().activation_func()
    off = mh.get_decoder_block_spec(tiny_config(), "hybridnorm", use_transformer_engine=True)
    assert off.layer_specs[0].submodules.mlp.keywords["submodules"].activation_func is None


def test_fsdp_with_tensor_parallel_head_norms_is_said_to_be_untested():
    from types import SimpleNamespace

    args = SimpleNamespace(use_megatron_fsdp=True, use_torch_fsdp2=False)
    tp2 = tiny_config(tensor_model_parallel_size=2)
    [note] = entrypoints.untested_notes(get_scheme("hybridnorm"), tp2, args)
    assert note.startswith("--use-megatron-fsdp with tensor parallelism is untested")
    assert entrypoints.untested_notes(get_scheme("prenorm"), tp2, args) == []  # no per-head norms
    assert entrypoints.untested_notes(get_scheme("hybridnorm"), tiny_config(), args) == []  # TP = 1
    # not in Megatron-LM
    assert entrypoints.untested_notes(get_scheme("hybridnorm"), tp2, None) == []
