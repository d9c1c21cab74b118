"""Post-import hooks: call a function right after a named module has been executed, without importing it early.

A meta path finder at the front of sys.meta_path answers only for the watched names: it asks the other finders for
the module's spec and wraps the loader so that the callback runs once the module's code has run. Every other
import costs one dict lookup.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # this runs at interpreter start: typing and collections are not imported for annotations
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    Callback = Callable[[ModuleType], None]


class PostImportFinder:
    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callback]] = {}
        self._busy: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.callbacks or name in self._busy:
            return None
        self._busy.add(name)
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        finally:
            self._busy.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _CallingLoader(spec.loader, name, self)
        return spec

    def invalidate_caches(self) -> None:
        pass


class _CallingLoader:
    def __init__(self, loader: Any, name: str, finder: PostImportFinder):
        self.loader, self.name, self.finder = loader, name, finder

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its real loader: inspect, linecache and importlib.resources read through it.
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        for callback in self.finder.callbacks.pop(self.name, ()):
            callback(module)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.loader, attr)


_finder: PostImportFinder | None = None


def when_imported(name: str, callback: Callback) -> None:
    """callback(module) once `name` has been imported: now if it already has been, else right after its import."""
    global _finder
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    if _finder is None:
        _finder = PostImportFinder()
        sys.meta_path.insert(0, _finder)
    _finder.callbacks.setdefault(name, []).append(callback)
