"""Which path a norm call takes, a Triton kernel or torch, and why.

``HYBRIDNORM_KERNELS``: "torch" (the default: never), "auto" (the kernels on CUDA tensors) or
"triton" (always; on a CPU this needs Triton's interpreter, ``TRITON_INTERPRET=1``).

The kernels are opt-in until they have run on a GPU: they are proved against float64 under
Triton's interpreter and compiled for sm_90, but a user's first GPU run would otherwise be their
first execution on hardware. The GPU check (``scripts/gpu_check.py``) measures them; the default
becomes "auto" where it shows them correct and faster than torch. The kernels compute fp32,
bf16 and fp16 tensors; other dtypes (fp64) always take torch. When a CUDA tensor cannot use
Triton in "auto" (not installed, or its import fails), a warning says so once.

The setting is read once per model build: each norm and attention module reads it as it is
built (``kernel_setting``) and keeps it, so changing the variable later does not change a built
model's paths.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

MODES = ("torch", "auto", "triton")
DEFAULT = "torch"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON = "triton"


_READ_NOW = object()


def kernel_setting(environ=os.environ) -> str | None:
    """``HYBRIDNORM_KERNELS`` as set, checked; None when unset (the default, torch)."""
    mode = environ.get("HYBRIDNORM_KERNELS")
    if mode is not None and mode not in MODES:
        raise ValueError(f"HYBRIDNORM_KERNELS={mode!r}; choose one of {', '.join(MODES)}")
    return mode


def kernel_mode() -> str:
    return kernel_setting() or DEFAULT


@functools.cache
def triton_problem() -> str | None:
    """None when Triton imports; else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install raises more than ImportError
        return f"{type(e).__name__}: {e}"
    return None


@functools.cache
def _warn_no_triton(problem: str) -> None:
    warnings.warn(
        f"megatron-hybridnorm: CUDA tensors, but Triton cannot be used ({problem}); the norms "
        "run on torch. Install Triton (it comes with PyTorch's CUDA wheels), or unset "
        "HYBRIDNORM_KERNELS (torch is the default) to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )


def kernel_path(x: torch.Tensor, setting=_READ_NOW) -> tuple[bool, str]:
    """(whether the Triton kernels handle ``x``, the reason in words) under ``setting``, a
    module's ``kernel_setting()`` from when it was built (by default, the environment's now)."""
    if setting is _READ_NOW:
        setting = kernel_setting()
    mode = setting or DEFAULT
    if mode == "torch":
        if setting is None:
            return False, "the default; HYBRIDNORM_KERNELS=auto opts in to the kernels on CUDA"
        return False, "HYBRIDNORM_KERNELS=torch"
    if x.dtype not in DTYPES:
        return False, f"{x.dtype} (the kernels compute fp32, bf16 and fp16)"
    if mode == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("HYBRIDNORM_KERNELS=triton on a CPU tensor needs Triton's "
                               "interpreter: set TRITON_INTERPRET=1 before importing")
        return True, "HYBRIDNORM_KERNELS=triton"
    if not x.is_cuda:
        return False, f"{x.device.type} tensor"
    problem = triton_problem()
    if problem is not None:
        _warn_no_triton(problem)
        return False, f"Triton unavailable ({problem})"
    return True, "CUDA tensor"


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels handle tensor ``x``."""
    return kernel_path(x)[0]
