"""Says once which path each norm took: a fused kernel or torch, and why.

Norm modules and the attention keep the path of their last call in ``kernel_path``. A layer
reports its table after its first forward; a norm outside the layers (the final norm) reports
itself. A table already shown in this process is not shown again, so a model prints one line per
distinct kind of layer. Printed on rank 0, like Megatron's start-up lines, or collected
(``divert``) by a tool that prints them after its progress bars.
"""

from __future__ import annotations

import torch

_shown: set = set()
_sink: list | None = None


def divert(sink: list | None) -> None:
    """Collect the report lines in ``sink`` instead of printing them (a tool with progress bars
    prints them once, afterwards); None prints them again."""
    global _sink
    _sink = sink


def record(module: torch.nn.Module, path: str) -> None:
    module.kernel_path = path


def paths(module: torch.nn.Module) -> dict[str, str]:
    """``{submodule name: path}`` for every submodule that has run a norm."""
    return {name or type(module).__name__: m.kernel_path for name, m in module.named_modules()
            if getattr(m, "kernel_path", None)}


def report(what: str, module: torch.nn.Module) -> str | None:
    """Print ``module``'s paths once per distinct table; returns the line (None if not new)."""
    table = paths(module)
    key = tuple(sorted(table.items()))
    if not table or key in _shown:
        return None
    _shown.add(key)
    line = f"megatron-hybridnorm: norm kernels of {what}: " + "; ".join(
        f"{name}: {path}" for name, path in table.items())
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        if _sink is not None:
            _sink.append(line)
        else:
            print(line, flush=True)
    return line


def report_after_first_forward(module: torch.nn.Module, what) -> None:
    """Register a hook that reports ``module`` after its first forward, then removes itself.
    ``what``: a label, or a callable returning one."""

    def hook(mod, args, output):
        handle.remove()
        report(what() if callable(what) else what, mod)

    handle = module.register_forward_hook(hook)
