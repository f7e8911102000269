"""Spec-build-time checks: a config that contradicts the scheme fails here, naming the fix."""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hybridnorm.norms.base import NORMALIZATIONS
from megatron_hybridnorm.schemes import OPTION_DEFAULTS, LayerNorms, Scheme
from megatron_hybridnorm.transformer.core_attention import check_sdpa_config

QKV_NORMS = ("head", "full")
# the TE backend's pre-MLP norm whose output is also the residual (HybridNorm's FFN, Post-Norm):
# TE's RMSNorm module, this package's Triton add + norm, or TE's LayerNormLinear returning its
# norm output (the norm inside the FFN's first linear)
TE_FFN_NORMS = ("te", "fused_add", "in_linear")


class SchemeConfigError(ValueError):
    """The TransformerConfig and the chosen norm scheme cannot work together."""


class SchemeMismatchError(RuntimeError):
    """A checkpoint holds another norm scheme than the model it is loaded into."""


def check_options(scheme: Scheme, options: dict) -> dict:
    """Resolve a scheme's options; an option the scheme does not use is an error."""
    known = scheme.option_defaults()
    unknown = set(options) - set(known)
    if unknown:
        takes = f"the options {sorted(known)}" if known else "no options"
        raise SchemeConfigError(f"scheme {scheme.name!r} takes {takes}; got {sorted(unknown)}")
    resolved = {**known, **options}
    if resolved.get("qkv_norm", OPTION_DEFAULTS["qkv_norm"]) not in QKV_NORMS:
        raise SchemeConfigError(f"qkv_norm must be one of {QKV_NORMS}, got {resolved['qkv_norm']!r}")
    if resolved.get("te_ffn_norm", OPTION_DEFAULTS["te_ffn_norm"]) not in TE_FFN_NORMS:
        raise SchemeConfigError(
            f"te_ffn_norm must be one of {TE_FFN_NORMS}, got {resolved['te_ffn_norm']!r}")
    if "mixln_fraction" in resolved and not 0.0 <= resolved["mixln_fraction"] <= 1.0:
        raise SchemeConfigError(
            f"mixln_fraction must lie in [0, 1], got {resolved['mixln_fraction']}"
        )
    return resolved


def check_config(
    config: TransformerConfig,
    scheme: Scheme,
    layouts: list[LayerNorms],
    options: dict,
    use_transformer_engine: bool,
) -> None:
    def fail(msg: str):
        raise SchemeConfigError(f"norm scheme {scheme.name!r}: {msg}")

    has_head_norms = any(lay.has_head_norms for lay in layouts)
    norm_is_residual = any(lay.pre_mlp_is_residual or lay.input_is_residual for lay in layouts)

    if config.normalization not in NORMALIZATIONS:
        fail(f"normalization={config.normalization!r}; set it to one of {NORMALIZATIONS}")
    if getattr(config, "transformer_impl", None) == "inference_optimized":
        fail('transformer_impl="inference_optimized" builds megatron-core\'s inference layers, '
             "which these specs do not provide (they would build the local modules instead); "
             'use "transformer_engine" or "local" (--transformer-impl)')
    if getattr(config, "use_kitchen", False):
        fail("use_kitchen swaps in NVIDIA Kitchen's quantized modules, which these specs do "
             "not build; unset it (--use-kitchen)")
    if config.multi_latent_attention:
        fail("multi-latent attention is not supported; set multi_latent_attention=False")
    if getattr(config, "experimental_attention_variant", None) is not None:
        fail("experimental_attention_variant is not supported; leave it None")
    if config.qk_l2_norm:
        fail(
            "qk_l2_norm replaces the Q/K norms with a weightless L2 norm; unset it "
            "(the scheme places its own norms)"
        )
    if config.qk_layernorm and not any(lay.q and lay.k for lay in layouts):
        fail("qk_layernorm=True asks for Q/K norms this scheme does not have; "
             "use scheme 'prenorm_qknorm', or unset qk_layernorm")
    if has_head_norms and getattr(config, "fused_single_qkv_rope", False):
        fail("fused_single_qkv_rope applies RoPE to the unsplit QKV, before the Q/K/V norms "
             "can run; unset fused_single_qkv_rope")
    if (
        norm_is_residual
        and config.recompute_granularity == "selective"
        and "layernorm" in (config.recompute_modules or [])
    ):
        fail('recompute_modules contains "layernorm", but a norm of this scheme has an output '
             "that is also the residual, which that recompute frees; remove \"layernorm\" from "
             "recompute_modules (--recompute-modules)")
    if config.memory_efficient_layer_norm:
        fail("memory_efficient_layer_norm is an Apex option these norms do not implement; unset it")
    tp = config.tensor_model_parallel_size
    if config.num_attention_heads % tp:
        fail(f"num_attention_heads={config.num_attention_heads} is not divisible by "
             f"tensor_model_parallel_size={tp}")
    groups = config.num_query_groups or config.num_attention_heads
    if groups % tp and tp % groups:
        fail(f"num_query_groups={groups} and tensor_model_parallel_size={tp}: one must divide "
             "the other")
    if options.get("qkv_norm") == "full" and has_head_norms and groups % tp:
        fail(f'qkv_norm="full" normalizes each rank\'s KV heads together, but '
             f"tensor_model_parallel_size={tp} > num_query_groups={groups} replicates KV heads; "
             f'use TP <= {groups} (dividing it) or qkv_norm="head"')
    te_ffn_norm = options.get("te_ffn_norm", OPTION_DEFAULTS["te_ffn_norm"])
    if te_ffn_norm != OPTION_DEFAULTS["te_ffn_norm"] and not use_transformer_engine:
        fail(f"te_ffn_norm={te_ffn_norm!r} chooses among Transformer Engine modules; build the "
             "spec with use_transformer_engine=True, or leave te_ffn_norm unset (the local "
             "backend runs this package's add + norm)")
    if te_ffn_norm == "in_linear" and config.num_moe_experts and any(
            lay.pre_mlp_is_residual for lay in layouts):
        fail('te_ffn_norm="in_linear" puts the norm inside a dense FFN\'s first linear; MoE '
             'layers have none: use te_ffn_norm="te" or "fused_add"')
    if te_ffn_norm == "in_linear" and any(lay.pre_mlp_is_residual for lay in layouts):
        # the FFN's first linear keeps its norm output for the layer's residual add; run under
        # recompute (tensor_parallel.checkpoint, or TE's checkpoint under FP8) that output carries
        # no graph, and n + FFN(n) would back-propagate through FFN(n) alone; chunked MLPs keep
        # only the last chunk's output
        if (config.recompute_granularity == "selective"
                and "mlp" in (config.recompute_modules or [])):
            fail('te_ffn_norm="in_linear" keeps the FFN input n for the residual add, which MLP '
                 "recompute runs without a graph (the gradient through n would be lost); remove "
                 '"mlp" from recompute_modules (--recompute-modules), or use te_ffn_norm="te" '
                 'or "fused_add"')
        if (getattr(config, "mlp_chunks_for_training", 1) or 1) > 1:
            fail('te_ffn_norm="in_linear" keeps one FFN input for the residual add, but '
                 "mlp_chunks_for_training > 1 runs the FFN in chunks; set it to 1, or use "
                 'te_ffn_norm="te" or "fused_add"')
    moe_layers_with_our_norms = config.num_moe_experts and any(
        lay.pre_mlp_is_residual or lay.post_mlp or lay.input_is_residual or lay.attn_output
        or lay.mlp_output or lay.deepnorm for lay in layouts)
    if getattr(config, "overlap_moe_expert_parallel_comm", False) and moe_layers_with_our_norms:
        fail("overlap_moe_expert_parallel_comm runs MoE layers through megatron-core's "
             "fine-grained callables, which call the pre-MLP norm and the residual adds "
             "directly and so skip this scheme's norms around the adds (and DeepNorm's residual "
             "scale); unset it "
             "(--overlap-moe-expert-parallel-comm)")
    if use_transformer_engine:
        if config.normalization == "DyT":
            fail("normalization='DyT' has no Transformer Engine module (TE's norms are RMSNorm "
                 "and LayerNorm, and its fused norm-linears cannot take it); build the spec "
                 "with use_transformer_engine=False (--transformer-impl local)")
        return
    if config.use_te_activation_func:
        fail("use_te_activation_func uses Transformer Engine's activation module; build the "
             "spec with use_transformer_engine=True, or unset it")
    if config.fp8 or config.fp4:
        fail("FP8/FP4 run through Transformer Engine's linears; build the spec with "
             "use_transformer_engine=True")

    try:
        check_sdpa_config(config)
    except ValueError as e:
        fail(str(e))
