"""One small registry class and the registries the library uses.

Methods, pipeline modules, datasets, backbones and CRF backends are looked up by short name; out-of-tree code adds
entries through the ``wsss.plugins`` entry-point group (each entry point is a module imported once).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any


class Registry:
    """Maps a short name to a class or factory.

    Args:
        kind: what the registry holds, used in error messages ("method", "dataset" ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator that registers ``obj`` under ``name``; a duplicate name is an error."""

        def deco(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        """The entry called ``name``; an unknown name raises KeyError with the closest matches."""
        _load_builtins()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise KeyError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def entries(self) -> dict[str, Any]:
        """{name: entry} of every registered entry (a copy)."""
        _load_builtins()
        return dict(self._items)

    def names(self) -> list[str]:
        """Sorted registered names."""
        _load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._items


METHODS = Registry("method")
DATASETS = Registry("dataset")
BACKBONES = Registry("backbone")
CRF = Registry("crf backend")
MODULES = Registry("pipeline module")

# The packages whose files register the built-in entries: each package's __init__ imports its own files.
BUILTIN_PACKAGES = ("wsss.methods", "wsss.data.datasets", "wsss.models", "wsss.cam")
PLUGIN_GROUP = "wsss.plugins"

_loaded = False


def _load_builtins() -> None:
    """Import the built-in packages, then every ``wsss.plugins`` entry point; done once, lazily (on the first
    lookup, so ``import wsss`` stays light)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    from importlib.metadata import entry_points

    for package in BUILTIN_PACKAGES:
        importlib.import_module(package)
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as e:  # the plugin's own bug: name it, keep its traceback as the cause
            raise ImportError(f"wsss plugin '{ep.name}' ({ep.value}) failed to load: {type(e).__name__}: {e}") from e
