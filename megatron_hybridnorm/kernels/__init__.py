"""Triton kernels for the norms HybridNorm adds: a row-wise RMSNorm and a fused Q/K/V norm.

Which path runs is decided per call (``use_triton``): on CUDA tensors the kernels, elsewhere
torch. ``HYBRIDNORM_KERNELS=triton`` forces the kernels (on a CPU they need Triton's
interpreter, ``TRITON_INTERPRET=1``), ``HYBRIDNORM_KERNELS=torch`` forces torch.
"""

from __future__ import annotations

import os

MODES = ("auto", "triton", "torch")
MAX_HEAD_DIM = 256  # the fused Q/K/V norm keeps a group's heads in registers


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
