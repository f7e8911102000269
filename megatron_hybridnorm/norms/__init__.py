"""Norm modules: residual-stream norms and the Q/K/V norms inside attention."""

from .head import FullWidthNorm, HeadNorm
from .residual import Norm, PostNorm

__all__ = ["Norm", "PostNorm", "HeadNorm", "FullWidthNorm"]
