"""How the kernels are launched: tile shapes, warps and a persistent grid, from a small table.

Every kernel here is bound by memory traffic. A program works on a tile of several rows (or
heads) at once, so that several row loads are in flight, and loops over tiles with a stride of
the grid size; the grid is a few programs per SM. That keeps the per-program weight-gradient
partial sums few (one row per program, summed by torch afterwards).

``launch(kernel, width)`` gives the default for a kernel and row width. ``CANDIDATES`` is the
short list a GPU run sweeps (``benchmarks/bench_norms.py --tune``) to pick the defaults;
``forced(kernel, config)`` runs one candidate.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

# Widest row (elements, a power of 2) one program keeps in registers in a single pass; wider
# rows are processed in chunks of this size, reading the row twice.
MAX_BLOCK = 8192
INTERPRETER_SMS = 3  # on the CPU: few programs, so that each loops over several tiles


@dataclass(frozen=True)
class Launch:
    rows: int  # rows (RMSNorm, full-width Q/K/V norm) or heads (per-head Q/K/V norm) per tile
    warps: int
    programs_per_sm: int


KERNELS = ("rms_fwd", "rms_bwd", "qkv_fwd", "qkv_bwd", "full_fwd", "full_bwd")


def _rows_for(width: int, elements: int) -> int:
    """Rows per tile so that a tile holds about ``elements`` values (at most 16 rows)."""
    return max(1, min(16, elements // block_width(width)))


# Tile size (elements) and elements per thread of each kernel's default. Chosen on the CPU from
# what ptxas reports for sm_90 (tests/compile_kernels.py: no spills, at least 16 warps resident
# per SM at the 1.2B shapes); to be confirmed by timing on a GPU (bench_norms.py --tune).
TILE = {"rms_fwd": (8192, 16), "rms_bwd": (4096, 16), "full_fwd": (8192, 16),
        "full_bwd": (4096, 16), "qkv_fwd": (2048, 8), "qkv_bwd": (1024, 4)}


def _default(kernel: str, width: int) -> Launch:
    elements, per_thread = TILE[kernel]
    rows = _rows_for(width, elements) if kernel.startswith(("rms", "full")) else \
        max(1, elements // block_width(width))  # qkv: a tile of heads, each head_dim wide
    warps = max(4, min(16, rows * block_width(width) // (32 * per_thread)))
    return Launch(rows, warps, 2)


def _candidates(kernel: str, width: int) -> list[Launch]:
    """The defaults' neighbours: half and double the tile, fewer and more warps, more programs."""
    d = _default(kernel, width)
    out = [d]
    for rows in (d.rows // 2, d.rows * 2):
        if 1 <= rows <= 64 and rows * block_width(width) <= 4 * MAX_BLOCK:
            out.append(Launch(rows, d.warps, d.programs_per_sm))
    for warps in (d.warps // 2, d.warps * 2):
        if 4 <= warps <= 16:
            out.append(Launch(d.rows, warps, d.programs_per_sm))
    out.append(Launch(d.rows, d.warps, d.programs_per_sm * 2))
    return out


_forced: dict[str, Launch] = {}


def launch(kernel: str, width: int) -> Launch:
    """The launch config of ``kernel`` for rows of ``width`` elements (head_dim for qkv_*)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    return _forced.get(kernel) or _default(kernel, width)


def candidates(kernel: str, width: int) -> list[Launch]:
    return _candidates(kernel, width)


@contextlib.contextmanager
def forced(kernel: str, config: Launch):
    """Launch ``kernel`` with ``config`` inside the block (for tuning and tests)."""
    launch(kernel, 1)  # validates the name
    previous = _forced.get(kernel)
    _forced[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(kernel, None)
        else:
            _forced[kernel] = previous


def block_width(width: int) -> int:
    """The tile's column count: the row padded to a power of 2 (at least 16), at most MAX_BLOCK."""
    return min(MAX_BLOCK, max(16, 1 << (max(width, 1) - 1).bit_length()))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def grid(tiles: int, device: torch.device, config: Launch) -> int:
    """Programs to launch for ``tiles`` tiles: at most a few per SM (persistent programs)."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else INTERPRETER_SMS
    return max(1, min(tiles, sms * config.programs_per_sm))


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def heads_view(t: torch.Tensor, seq: int, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    """``t`` as [seq, batch, heads, head_dim] with contiguous heads: a view where one exists
    (attention's backward may hand over strided gradients; kernels read them in place)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(seq, batch, heads, head_dim)


def seq_batch(lead: tuple, rows: int) -> tuple[int, int]:
    """(seq, batch) of a kernel's rows: the two leading dims of [s, b, ...], else (rows, 1)."""
    return (lead[0], lead[1]) if len(lead) == 2 else (rows, 1)


def empty(shape, dtype, device):
    """Output allocation (tests poison it to prove every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)
