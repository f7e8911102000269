"""HybridNorm and HybridNorm* (arXiv 2503.04598) for Megatron-Core, with baselines.

The API is imported on first use (PEP 562): importing megatron-core prints its fallback warnings
(no Apex, no Transformer Engine), and the command-line tools decide whether to show them before
anything imports it.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "apply_small_init": "transformer.init",
    "SCHEMES": "schemes",
    "LayerNorms": "schemes",
    "Scheme": "schemes",
    "get_scheme": "schemes",
    "get_decoder_block_spec": "models.gpt.specs",
    "get_layer_spec": "models.gpt.specs",
    "SchemeConfigError": "transformer.validate",
    "SchemeMismatchError": "transformer.validate",
}


def get_hybrid_stack_spec(*args, **kwargs):
    """The ``HybridModel`` stack spec of a scheme (``models.hybrid.specs.get_hybrid_stack_spec``);
    needs megatron-core >= 0.18, which has ``HybridModel``."""
    from megatron_hybridnorm import compat

    compat.require_hybrid_model("get_hybrid_stack_spec")
    from megatron_hybridnorm.models.hybrid import get_hybrid_stack_spec as build

    return build(*args, **kwargs)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    else:
        try:  # a submodule, as ``megatron_hybridnorm.models`` after ``import megatron_hybridnorm``
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_API])


__all__ = [
    "SCHEMES",
    "LayerNorms",
    "Scheme",
    "SchemeConfigError",
    "SchemeMismatchError",
    "apply_small_init",
    "get_decoder_block_spec",
    "get_hybrid_stack_spec",
    "get_layer_spec",
    "get_scheme",
]
