"""The norm schemes on megatron-core's ``HybridModel``: a decoder given as a layer pattern
(``*`` attention, ``-`` MLP, ``E`` MoE, ``M`` Mamba, ``|`` a pipeline split)."""

from megatron_hybridnorm.compat import require_hybrid_model

require_hybrid_model("megatron_hybridnorm.models.hybrid")

from megatron_hybridnorm.models.hybrid.layouts import PatternLayer, pattern_layouts
from megatron_hybridnorm.models.hybrid.specs import get_hybrid_stack_spec
from megatron_hybridnorm.models.hybrid.stack import HybridNormStack

__all__ = ["HybridNormStack", "PatternLayer", "get_hybrid_stack_spec", "pattern_layouts"]
