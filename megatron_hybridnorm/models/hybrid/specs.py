"""The stack spec for megatron-core's ``HybridModel``, built from the scheme tables: its
attention, MLP and MoE layers are ``layer_specs``' (the GPT layer spec's halves), its Mamba and
gated-delta-net layers megatron-core's own.
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hybridnorm.schemes import Scheme, resolve_scheme
from megatron_hybridnorm.models.gpt.specs import backend
from megatron_hybridnorm.transformer.validate import check_options
from megatron_hybridnorm.models.hybrid.layer_specs import megatron_layer_specs, pattern_layer_specs
from megatron_hybridnorm.models.hybrid.stack import HybridNormStack, HybridNormStackSubmodules


def get_hybrid_stack_spec(
    config: TransformerConfig,
    scheme: str | Scheme,
    hybrid_layer_pattern: str | None = None,
    *,
    use_transformer_engine: bool = False,
    **options,
) -> ModuleSpec:
    """The decoder of a ``HybridModel`` for ``scheme``: pass it as ``hybrid_stack_spec``, with
    the same ``hybrid_layer_pattern`` (e.g. ``"*-" * L`` for a GPT model's L layers).

    The spec is checked here against the config and the pattern; each layer gets its norms by
    its place in the whole pattern when the model builds it. Without a pattern, the stack takes
    Megatron-LM's ``--hybrid-layer-pattern`` or, without a pipeline split, the layers it is
    given. Options as ``get_decoder_block_spec``.
    """
    s = resolve_scheme(scheme)
    if hybrid_layer_pattern is not None:
        pattern_layer_specs(config, s, hybrid_layer_pattern,
                            use_transformer_engine=use_transformer_engine, **options)
    else:
        check_options(s, options)
    return ModuleSpec(
        module=HybridNormStack,
        params={"scheme": s, "hybrid_layer_pattern": hybrid_layer_pattern,
                "use_transformer_engine": use_transformer_engine, "options": dict(options)},
        submodules=HybridNormStackSubmodules(
            **megatron_layer_specs(), final_norm=backend(use_transformer_engine).norm),
    )
