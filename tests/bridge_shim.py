"""Importing Megatron-Bridge on a machine without Transformer Engine, for the tests only.

Megatron-Bridge 0.6.2 imports two packages that a CPU machine cannot have, each in one module:
- ``megatron.bridge.peft.lora_layers`` imports ``transformer_engine.pytorch`` unguarded; its
  class bodies and annotations name ``te.ops.Sequential``, ``te.Linear`` and so on, and its
  ``isinstance`` checks compare against ``te.Linear``. LoRA is not used here.
- ``megatron.bridge.training.pretrain`` imports ``nvidia_resiliency_ext.inprocess.CallWrapper``
  for a type annotation; the newest nvidia-resiliency-ext on PyPI (0.4.1) is too old for
  megatron-core 0.19, which then fails to import.

The shim answers those two imports, and only for those two importing modules: an import finder
hands a stand-in module to them and to nobody else, and the stand-ins leave ``sys.modules``
at the next import made by any other module. So megatron-core and Bridge still see "Transformer
Engine is absent" everywhere else (``import_bridge`` checks that no other loaded module holds a
stand-in). The stand-ins' names are empty classes: an ``isinstance`` against them is False, and calling one raises. No installed
file is changed. Where Transformer Engine is installed, nothing is stood in.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# stand-in package -> the one module allowed to import it
SERVED_TO = {
    "transformer_engine": "megatron.bridge.peft.lora_layers",
    "transformer_engine.pytorch": "megatron.bridge.peft.lora_layers",
    "nvidia_resiliency_ext": "megatron.bridge.training.pretrain",
    "nvidia_resiliency_ext.inprocess": "megatron.bridge.training.pretrain",
}


class _Absent:
    """A name from a package this machine does not have."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__qualname__} comes from the test-only stand-in in "
                           "tests/bridge_shim.py: the real package is not installed")


class _StandIn(types.ModuleType):
    """Every attribute is a fresh empty class (or a nested stand-in for ``ops``)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = (_StandIn(f"{self.__name__}.{name}") if name == "ops"
                 else type(name, (_Absent,), {"__module__": self.__name__}))
        setattr(self, name, value)
        return value


def _importer() -> str | None:
    """The module whose import statement is being served (the first frame outside importlib)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
            ("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return frame.f_globals.get("__name__") if frame is not None else None


def _drop_stand_ins() -> None:
    for name in [n for n, m in sys.modules.items() if isinstance(m, _StandIn)]:
        del sys.modules[name]


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Sees every import of a module not yet loaded: it serves the stand-ins to their importer,
    and drops them from ``sys.modules`` at the first import by any other module (the served
    module has finished by then, or is importing from inside its own body)."""

    def find_spec(self, fullname, path=None, target=None):
        importer = _importer()
        if importer not in SERVED_TO.values():
            _drop_stand_ins()
        if SERVED_TO.get(fullname) != importer:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def import_bridge():
    """``megatron.bridge``, with the two stand-ins where their packages are missing."""
    import megatron.core  # noqa: F401  (first: its own probes for TE run without the finder)

    if "megatron.bridge" in sys.modules:
        return sys.modules["megatron.bridge"]
    stand_ins = [n for n in SERVED_TO if "." not in n and _missing(n)]
    finder = _Finder()
    if stand_ins:
        sys.meta_path.insert(0, finder)
    try:
        import megatron.bridge
        import megatron.bridge.training.pretrain  # noqa: F401
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        _drop_stand_ins()
    leaked = sorted(name for name, module in list(sys.modules.items())
                    if name not in (*SERVED_TO.values(), __name__) and _holds_stand_in(module))
    if leaked:
        raise RuntimeError(f"the test-only stand-ins reached {leaked}: they would take a "
                           "missing package for a present one")
    return megatron.bridge


def _holds_stand_in(module) -> bool:
    return any(_is_stand_in(v) for v in list(vars(module).values()))


def _is_stand_in(value) -> bool:
    try:  # (some modules hold lazy objects that raise on any attribute access)
        return isinstance(value, _StandIn) or any(
            c is _Absent for c in type.__getattribute__(value, "__mro__"))
    except Exception:
        return False
