"""Old import paths kept working after a module moved (difflab 0.1 layout -> the current one).

:func:`alias_submodules` makes ``import OLD`` give the module at its new place (the same module object, so a
``monkeypatch`` on either name reaches the code), with a :class:`DeprecationWarning`. No file stays at the old
path, so git follows the moved files and edits made to them elsewhere merge into their new place.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec) -> ModuleType:
        warnings.warn(f"{spec.name} is deprecated; import {self.target}", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.target)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._real_spec  # the import system stamped the alias spec on the real module


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, aliases: dict[str, str]):
        self.aliases = aliases

    def find_spec(self, fullname: str, path=None, target=None):
        new = self.aliases.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def alias_submodules(package: str, moved: dict[str, str]) -> None:
    """``package.OLD`` -> module ``moved[OLD]``, imported lazily on first use."""
    sys.meta_path.insert(0, _AliasFinder({f"{package}.{old}": new for old, new in moved.items()}))
