"""The optional extras and what each tool needs from them.

The core install is what the specs need (torch, megatron-core); a training container should not
pull a plotting stack to build a layer spec. A tool run without its extra stops at start-up and
names the extra, instead of failing on an import halfway through a run.
"""

from __future__ import annotations

import importlib

EXTRAS = {  # the extra -> the modules the tools import from it (pyproject.toml lists the packages)
    "train": ("matplotlib", "tqdm"),  # hybridnorm-train's plots and progress bars
}


class MissingExtra(RuntimeError):
    """A tool was run without the optional extra it needs."""


def require(extra: str, tool: str) -> None:
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtra(f"{tool} needs {', '.join(missing)}, from the [{extra}] extra: "
                           f"pip install 'megatron-hybridnorm[{extra}]'")
