"""The spec of each attention, MLP and MoE layer of a ``HybridModel`` pattern.

Each is this package's GPT layer spec (``models.gpt.specs.get_layer_spec``) for its half of the
scheme's layout, with the other sublayer left out, so the norms, the Transformer Engine fusions
and the checkpoint names are the GPT model's.
"""

from __future__ import annotations

from dataclasses import replace

from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hybridnorm.transformer.layer import HybridTransformerLayer
from megatron_hybridnorm.schemes import LayerNorms, Scheme
from megatron_hybridnorm.models.gpt.specs import get_layer_spec
from megatron_hybridnorm.transformer.validate import SchemeConfigError, check_config, check_options
from megatron_hybridnorm.models.hybrid.layouts import (
    ATTENTION, MOE, PatternLayer, half, main_layers, pattern_layouts,
)


class PatternLayerModule(HybridTransformerLayer):
    """A hybrid pattern's attention-only or FFN-only layer (``symbol``). Its checkpoint holds
    its half of the layout; a GPT checkpoint's layer holds both halves, and either loads."""

    def __init__(self, *args, symbol: str = ATTENTION, **kwargs):
        super().__init__(*args, **kwargs)
        self.symbol = symbol

    def saved_norms(self, saved: dict):
        return half(LayerNorms(**saved), self.symbol)

    def describe(self) -> str:
        return f"hybrid layer {self.layer_number - 1} ({self.symbol!r})"


def pattern_layer_spec(layer: PatternLayer, *, num_experts: int | None = None,
                       num_blocks: int | None = None, **layer_options) -> ModuleSpec:
    """One pattern layer: the GPT layer spec of its norms, without the other sublayer. Where
    they depend on the block (LayerNorm Scaling, DeepNorm), its block and the number of blocks."""
    blocks = ({"block": layer.block, "num_blocks": num_blocks}
              if layer.norms.depth_scaled or layer.norms.deepnorm else {})
    spec = get_layer_spec(layer.norms, num_experts=num_experts if layer.symbol == MOE else None,
                          **layer_options)
    sub = spec.submodules
    if layer.symbol == ATTENTION:
        sub = replace(sub, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp,
                      mlp_output_layernorm=IdentityOp, post_mlp_layernorm=IdentityOp)
    else:
        sub = replace(sub, input_layernorm=IdentityOp, self_attention=IdentityOp,
                      self_attn_output_layernorm=IdentityOp, self_attn_bda=IdentityFuncOp)
    return ModuleSpec(module=PatternLayerModule,
                      params={**spec.params, "symbol": layer.symbol, **blocks},
                      submodules=sub)


def pattern_layer_specs(config: TransformerConfig, scheme: Scheme, pattern: str, *,
                        use_transformer_engine: bool = False,
                        **options) -> dict[int, ModuleSpec]:
    """The spec of every attention/MLP/MoE layer of ``pattern`` by global layer index; checks
    the config, the options and the pattern against the scheme first."""
    opts = check_options(scheme, options)
    layers = pattern_layouts(scheme, pattern, opts.get("mixln_fraction"))
    ours = [lay.norms for lay in layers if lay.norms is not None]
    check_config(config, scheme, ours, opts, use_transformer_engine)
    if any(lay.symbol == MOE for lay in layers) and not config.num_moe_experts:
        raise SchemeConfigError(f"hybrid layer pattern {pattern!r} has MoE layers ('E'); set "
                                "num_moe_experts (--num-experts)")
    # te_ffn_norm="in_linear" with MoE layers is refused by check_config (num_moe_experts set)
    te_ffn_norm = opts.get("te_ffn_norm")
    cache, specs = {}, {}
    num_blocks = main_layers(pattern).count(ATTENTION)
    for i, lay in enumerate(layers):
        if lay.norms is None:
            continue
        key = (lay.symbol, lay.norms, lay.block if lay.norms.depth_scaled else None)
        if key not in cache:
            cache[key] = pattern_layer_spec(
                lay, num_experts=config.num_moe_experts, num_blocks=num_blocks,
                qkv_norm=opts.get("qkv_norm"),
                moe_grouped_gemm=config.moe_grouped_gemm,
                use_transformer_engine=use_transformer_engine, te_ffn_norm=te_ffn_norm,
                use_te_activation_func=config.use_te_activation_func)
        specs[i] = cache[key]
    return specs


def megatron_layer_specs() -> dict:
    """megatron-core's own Mamba and gated-delta-net layers (Transformer Engine modules)."""
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    sub = hybrid_stack_spec.submodules
    return {"mamba_layer": sub.mamba_layer, "gdn_layer": sub.gdn_layer}
