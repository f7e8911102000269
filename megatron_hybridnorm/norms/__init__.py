"""Norm modules: residual-stream norms and the Q/K/V norms inside attention."""

from megatron_hybridnorm.norms.head import FullWidthNorm, HeadNorm
from megatron_hybridnorm.norms.residual import Norm, PostNorm

__all__ = ["Norm", "PostNorm", "HeadNorm", "FullWidthNorm"]
