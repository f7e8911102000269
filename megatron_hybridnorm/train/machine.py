"""The CPU a run computed on: its model, its vector extensions and the kernels torch picked.

One seed's losses move with the CPU's float kernels (an AVX-512 machine sums in another order
than an AVX2 one), so each run records them: two runs' configs then tell a machine difference
from a code change.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

# the x86 extensions that change which float kernels run, in the order they appeared; on Arm
# the SIMD ones (NEON is "asimd" in /proc/cpuinfo)
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                     "asimd", "asimdhp", "sve", "sve2")


def _cpuinfo(text: str) -> tuple[str | None, set[str]]:
    model = re.search(r"(?m)^(?:model name|Model|Hardware|cpu model)\s*:\s*(.+)$", text)
    flags = re.search(r"(?m)^(?:flags|Features)\s*:\s*(.*)$", text)
    return (model.group(1).strip() if model else None,
            set(flags.group(1).split()) if flags else set())


def describe_cpu(cpuinfo: str | None = None) -> dict:
    """{"model", "vector_extensions", "torch_cpu_capability"}; ``cpuinfo`` is /proc/cpuinfo's
    text (read here when not given; other systems give the processor name platform knows)."""
    import torch

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = _cpuinfo(cpuinfo)
    return {
        "model": model or platform.processor() or platform.machine() or "unknown",
        "vector_extensions": [x for x in VECTOR_EXTENSIONS if x in flags],
        # ATen's dispatch level for its vectorized CPU kernels: DEFAULT, AVX2, AVX512, ...
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def cpu_line(cpu: dict) -> str:
    ext = " ".join(cpu["vector_extensions"]) or "none known"
    return f"{cpu['model']} ({ext}; torch's CPU kernels: {cpu['torch_cpu_capability']})"
