"""HybridNorm and HybridNorm* (arXiv 2503.04598) for Megatron-Core, with baselines."""

from . import compat
from .init import apply_small_init
from .schemes import SCHEMES, LayerNorms, Scheme, get_scheme
from .specs import get_decoder_block_spec, get_layer_spec
from .validate import SchemeConfigError

__version__ = "0.1.0"


def get_hybrid_stack_spec(*args, **kwargs):
    """The ``HybridModel`` stack spec of a scheme (``hybrid.specs.get_hybrid_stack_spec``);
    needs megatron-core >= 0.18, which has ``HybridModel``."""
    compat.require_hybrid_model("get_hybrid_stack_spec")
    from .hybrid import get_hybrid_stack_spec as build

    return build(*args, **kwargs)


__all__ = [
    "SCHEMES",
    "LayerNorms",
    "Scheme",
    "SchemeConfigError",
    "apply_small_init",
    "get_decoder_block_spec",
    "get_hybrid_stack_spec",
    "get_layer_spec",
    "get_scheme",
]
