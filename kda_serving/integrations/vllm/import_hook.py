"""Run a callback right after a module is imported, without importing it ourselves.

The plugin must stay light at load time (vLLM's model modules pull in numba and must not be
imported from ``register()``), yet some CPU fixes patch those modules; this defers them to
the moment vLLM imports the module itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Callable


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner, callback):
        self._inner = inner
        self._callback = callback

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        self._callback(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.callbacks: dict[str, list[Callable]] = {}
        self._busy: set[str] = set()

    def find_spec(self, name, path, target=None):
        if name not in self.callbacks or name in self._busy:
            return None
        self._busy.add(name)
        try:  # let the other finders locate the module, then wrap its loader
            spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        finally:
            self._busy.discard(name)
        if spec is None or spec.loader is None:
            return None
        callbacks = self.callbacks[name]
        spec.loader = _PatchingLoader(spec.loader, lambda mod: [cb(mod) for cb in callbacks])
        return spec


_FINDER = _PostImportFinder()


def when_imported(module_name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once ``module_name`` is imported (now, if it already is)."""
    if module_name in sys.modules:
        callback(sys.modules[module_name])
        return
    _FINDER.callbacks.setdefault(module_name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
