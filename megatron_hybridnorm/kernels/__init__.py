"""Triton kernels for the norms HybridNorm adds: a row-wise RMSNorm (with the residual add before
it) and fused Q/K/V norms.

Which path runs is decided per call (``dispatch.py``) under ``HYBRIDNORM_KERNELS``, which each
module reads once, as the model is built: torch by default; "auto", the kernels on CUDA tensors;
"triton", always. How they launch is ``launch.py``; which path each
norm took is printed once (``report.py``).
"""

from __future__ import annotations

from megatron_hybridnorm.kernels.dispatch import (MODES, kernel_mode, kernel_path, kernel_setting,
                                                  use_triton)

MAX_HEAD_DIM = 256  # the per-head Q/K/V norm keeps a head in one tile row
# the full-width Q/K/V norm keeps a token's q row (padded to powers of 2) in registers
MAX_FULL_ROW = 2**14

__all__ = ["MODES", "kernel_mode", "kernel_path", "kernel_setting", "use_triton", "MAX_HEAD_DIM", "MAX_FULL_ROW"]


def fused_qkv_norm(*args, **kwargs):
    """See ``kernels/qkv_norm.py`` (imports Triton on first use)."""
    # here, not at the top: kernels/qkv_norm.py imports Triton, an optional dependency
    from megatron_hybridnorm.kernels.qkv_norm import qkv_norm as fused

    return fused(*args, **kwargs)


def rope_tables(*args, **kwargs):
    """See ``kernels/qkv_norm.py``."""
    # here, not at the top: Triton (as above)
    from megatron_hybridnorm.kernels.qkv_norm import rope_tables as tables

    return tables(*args, **kwargs)


def fused_qkv_full_norm(*args, **kwargs):
    """See ``kernels/qkv_full_norm.py`` (imports Triton on first use)."""
    # here, not at the top: Triton (as above)
    from megatron_hybridnorm.kernels.qkv_full_norm import qkv_full_norm as fused

    return fused(*args, **kwargs)


def full_row_fits(groups: int, heads_per_group: int, head_dim: int) -> bool:
    """Whether the full-width Q/K/V norm kernel takes this rank's q row."""
    def pow2(n):
        return 1 << (n - 1).bit_length()

    return pow2(groups) * pow2(heads_per_group * head_dim) <= MAX_FULL_ROW
