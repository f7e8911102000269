"""``HybridNormStack``: megatron-core's ``HybridStack`` whose attention, MLP and MoE layers carry
a norm scheme, each layer by its place in the whole pattern, and whose final norm is the
scheme's backend's (megatron-core's stack always builds Transformer Engine's)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_hybridnorm.models.gpt.specs import backend
from megatron_hybridnorm.transformer.validate import SchemeConfigError
from megatron_hybridnorm.models.hybrid.layouts import check_segment
from megatron_hybridnorm.models.hybrid.layer_specs import pattern_layer_specs
from megatron_hybridnorm.schemes import Scheme, resolve_scheme


@dataclass
class HybridNormStackSubmodules(HybridStackSubmodules):
    final_norm: object = None


class _LayerAtPosition:
    """Builds the spec of the layer at the global position it is asked for. ``HybridStack``
    builds every layer of a kind from one spec; a scheme's layers differ by position
    (HybridNorm*'s first block, Mix-LN's first blocks), so this stands in for that one spec."""

    def __new__(cls, *args, specs: dict, layer_number: int, **kwargs):
        return build_module(specs[layer_number - 1], *args, layer_number=layer_number, **kwargs)


def _megatron_lm_pattern() -> str | None:
    from megatron_hybridnorm.models.gpt.entrypoints import _megatron_lm_args

    return getattr(_megatron_lm_args(), "hybrid_layer_pattern", None)


def whole_pattern(pattern, layer_type_list, pp_layer_offset, pg_collection) -> str:
    """The model's pattern: as given, else Megatron-LM's, else this stage's layers when they are
    the whole model (no pipeline split)."""
    pattern = pattern or _megatron_lm_pattern()
    if pattern:
        return pattern
    pp = getattr(pg_collection, "pp", None)
    if pp_layer_offset == 0 and (pp is None or pp.size() == 1):
        return "".join(layer_type_list)
    raise SchemeConfigError(
        "a pipeline stage cannot tell where its layers sit in the model: pass the model's "
        "hybrid_layer_pattern to get_hybrid_stack_spec (Megatron-LM: --hybrid-layer-pattern)")


class HybridNormStack(HybridStack):
    """``HybridStack`` for a norm scheme (see ``layouts.py`` for where each norm sits)."""

    def __init__(self, config, submodules: HybridNormStackSubmodules, *, scheme: str | Scheme,
                 hybrid_layer_pattern: str | None = None, use_transformer_engine: bool = False,
                 options: dict | None = None, layer_type_list=None, pp_layer_offset: int = 0,
                 post_process: bool = True, post_layer_norm: bool = True, pg_collection=None,
                 **kwargs):
        if layer_type_list is None:
            raise SchemeConfigError("HybridNormStack is built by HybridModel, which hands it "
                                    "its pipeline segment (layer_type_list)")
        pattern = whole_pattern(hybrid_layer_pattern, layer_type_list, pp_layer_offset,
                                pg_collection)
        check_segment(pattern, layer_type_list, pp_layer_offset)
        scheme = resolve_scheme(scheme)
        specs = pattern_layer_specs(config, scheme, pattern,
                                    use_transformer_engine=use_transformer_engine,
                                    **(options or {}))
        self_spec = ModuleSpec(module=_LayerAtPosition, params={"specs": specs})
        picked = replace(submodules, attention_layer=self_spec, mlp_layer=self_spec,
                         moe_layer=self_spec)
        super().__init__(config, picked, layer_type_list=layer_type_list,
                         pp_layer_offset=pp_layer_offset, post_process=post_process,
                         post_layer_norm=False, pg_collection=pg_collection, **kwargs)
        self.scheme, self.hybrid_layer_pattern = scheme.name, pattern
        self.post_layer_norm = post_layer_norm
        if post_process and post_layer_norm:
            norm = submodules.final_norm or backend(use_transformer_engine).norm
            self.final_norm = norm(config=self.config,
                                   hidden_size=self.config.hidden_size,
                                   eps=self.config.layernorm_epsilon)
