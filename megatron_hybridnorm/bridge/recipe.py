"""A scheme put into a Megatron-Bridge recipe's ``ConfigContainer`` in one call."""

from __future__ import annotations

from megatron_hybridnorm.bridge.specs import (
    SchemeLayerSpec,
    check_bridge_config,
    transformer_config_of,
    uses_transformer_engine,
)
from megatron_hybridnorm.models.gpt.specs import get_decoder_block_spec
from megatron_hybridnorm.norms.base import NORMALIZATIONS
from megatron_hybridnorm.schemes import Scheme
from megatron_hybridnorm.transformer.validate import SchemeConfigError


def use_scheme(cfg, scheme: Scheme | str, *, normalization: str | None = None, **options):
    """Make ``cfg.model`` (a ``GPTModelProvider`` or ``GPTModelConfig``) build ``scheme``;
    returns ``cfg``.

    Sets ``transformer_layer_spec`` to the scheme's ``SchemeLayerSpec(scheme, options)``,
    ``qk_layernorm`` to whether the scheme has Q/K norms (what Megatron and Bridge read it
    for), and ``normalization`` where given (else the recipe's stays: "RMSNorm", "LayerNorm",
    or "DyT" on local modules). Then builds the spec once against the model config, so that a
    configuration the scheme cannot run is refused here, by name, and not at the first
    iteration. A changed ``qk_layernorm`` is printed."""
    spec = SchemeLayerSpec(scheme, options)
    model = cfg.model
    transformer = transformer_config_of(model)
    if normalization is not None:
        if normalization not in NORMALIZATIONS:
            raise SchemeConfigError(f"normalization={normalization!r}; use one of "
                                    f"{NORMALIZATIONS}")
        transformer.normalization = normalization
    qk = any(lay.q and lay.k for lay in spec.scheme.layouts(transformer.num_layers,
                                                            options.get("mixln_fraction")))
    if bool(transformer.qk_layernorm) != qk:
        print(f"megatron-hybridnorm: qk_layernorm {transformer.qk_layernorm} -> {qk}: norm "
              f"scheme {spec.scheme.name!r} {'has' if qk else 'has no'} Q/K norms", flush=True)
        transformer.qk_layernorm = qk
    check_bridge_config(model, spec.scheme)
    get_decoder_block_spec(transformer, spec.scheme.name, pp_rank=0,
                           use_transformer_engine=uses_transformer_engine(transformer),
                           **options)
    model.transformer_layer_spec = spec
    return cfg
