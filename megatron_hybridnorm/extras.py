"""The optional extras and what each tool needs from them.

The core install is what the specs need (torch, megatron-core); a training container should not
pull a plotting stack to build a layer spec. A tool run without its extra stops at start-up and
names the extra, instead of failing on an import halfway through a run.
"""

from __future__ import annotations

import importlib

EXTRAS = {  # the extra -> the modules the tools import from it (pyproject.toml lists the packages)
    "train": ("matplotlib", "tqdm"),  # hybridnorm-train's plots and progress bars
    "bridge": ("megatron.bridge",),  # megatron_hybridnorm.bridge
}


class MissingExtra(RuntimeError):
    """A tool was run without the optional extra it needs."""


def require(extra: str, tool: str) -> None:
    missing, broken = [], []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as e:
            if e.name and not module.startswith(e.name) and e.name != module:
                broken.append(f"{module} is installed but does not import ({e})")
            else:
                missing.append(module)
    if missing:
        raise MissingExtra(f"{tool} needs {', '.join(missing)}, from the [{extra}] extra: "
                           f"pip install 'megatron-hybridnorm[{extra}]'")
    if broken:
        raise MissingExtra(f"{tool}: {'; '.join(broken)}; install what it names (see the "
                           f"[{extra}] extra in the README)")
