"""HybridNorm and HybridNorm* (arXiv 2503.04598) for Megatron-Core, with baselines."""

from .hybrid import get_hybrid_stack_spec
from .init import apply_small_init
from .schemes import SCHEMES, LayerNorms, Scheme, get_scheme
from .specs import get_decoder_block_spec, get_layer_spec
from .validate import SchemeConfigError

__version__ = "0.1.0"

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
