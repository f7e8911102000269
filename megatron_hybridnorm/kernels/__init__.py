"""Triton kernels for the norms HybridNorm adds: a row-wise RMSNorm and a fused Q/K/V norm.

Which path runs is decided per call (``use_triton``): on CUDA tensors the kernels, elsewhere
torch. ``HYBRIDNORM_KERNELS=triton`` forces the kernels (on a CPU they need Triton's
interpreter, ``TRITON_INTERPRET=1``), ``HYBRIDNORM_KERNELS=torch`` forces torch.
"""

from __future__ import annotations

import os

MODES = ("auto", "triton", "torch")
MAX_HEAD_DIM = 256  # the fused Q/K/V norm keeps a group's heads in registers
MAX_FULL_ROW = 2**16  # the full-width Q/K/V norm keeps a token's q (padded to powers of 2) in registers


def kernel_mode() -> str:
    mode = os.environ.get("HYBRIDNORM_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"HYBRIDNORM_KERNELS={mode!r}; choose one of {', '.join(MODES)}")
    return mode


def use_triton(x) -> bool:
    """Whether the Triton kernels handle tensor ``x``."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("HYBRIDNORM_KERNELS=triton on a CPU tensor needs Triton's "
                               "interpreter: set TRITON_INTERPRET=1 before importing")
        return True
    return x.is_cuda and _have_triton()


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_qkv_norm(*args, **kwargs):
    """See ``kernels/qkv_norm.py`` (imports Triton on first use)."""
    from .qkv_norm import qkv_norm as fused

    return fused(*args, **kwargs)


def rope_tables(*args, **kwargs):
    """See ``kernels/qkv_norm.py``."""
    from .qkv_norm import rope_tables as tables

    return tables(*args, **kwargs)


def fused_qkv_full_norm(*args, **kwargs):
    """See ``kernels/qkv_full_norm.py`` (imports Triton on first use)."""
    from .qkv_full_norm import qkv_full_norm as fused

    return fused(*args, **kwargs)


def full_row_fits(groups: int, heads_per_group: int, head_dim: int) -> bool:
    """Whether the full-width Q/K/V norm kernel takes this rank's q row."""
    def pow2(n):
        return 1 << (n - 1).bit_length()

    return pow2(groups) * pow2(heads_per_group * head_dim) <= MAX_FULL_ROW
