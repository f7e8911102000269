"""A misspelt ``--spec`` scheme, said as such.

Megatron-LM reads the ``--spec`` object as ``vars(module)[name]`` (megatron-core's
``spec_utils.import_module``, 0.16 to 0.20), so a typo surfaced as a bare ``KeyError:
'hybridnorm_starr'`` from inside Megatron. An entry-point module calls ``name_the_schemes`` on
itself: its ``vars()`` then answers a missing name with the schemes there are. Attribute access,
assignment and ``import *`` are unchanged (only the mapping ``vars()`` returns is a copy that
knows what is missing).
"""

from __future__ import annotations

import sys
import types

_MODULE_DICT = types.ModuleType.__dict__["__dict__"]


class UnknownSpecError(KeyError):
    """``--spec MODULE NAME`` names no entry point of an entry-point module."""

    def __str__(self) -> str:  # KeyError shows its message as a repr
        return str(self.args[0])


class _Names(dict):
    def __init__(self, module: str, names, entries):
        super().__init__(names)
        self._module, self._entries = module, entries

    def __missing__(self, name):
        raise UnknownSpecError(
            f"--spec {self._module} {name}: {self._module} has no scheme {name!r}; its entry "
            f"points are {', '.join(self._entries)}")


def name_the_schemes(module_name: str, entries) -> None:
    """Make ``vars(sys.modules[module_name])[name]`` refuse an unknown ``name`` clearly."""
    entries = tuple(entries)

    class EntryPointModule(types.ModuleType):
        @property
        def __dict__(self):
            return _Names(module_name, _MODULE_DICT.__get__(self), entries)

    sys.modules[module_name].__class__ = EntryPointModule
