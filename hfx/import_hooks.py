"""Run a callback right after a module is imported, or at once if it already is.

``import hfx`` has to make the ``hfx`` model type, its attention plugins and its PEFT defaults
known to transformers and PEFT, but importing ``transformers.modeling_utils`` (torch and all)
or PEFT costs seconds, and ``hfx --help`` needs neither. So each registration is attached to
the module it extends: it runs the moment that module has finished executing, which is before
any user code can look at it, or immediately when the module is already loaded.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

Callback = Callable[[ModuleType], None]


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """A meta-path finder that finds nothing itself: it wraps the real loader of watched modules."""

    def __init__(self):
        self.callbacks: dict[str, list[Callback]] = {}
        self._finding: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.callbacks or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._finding.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            try:
                del loader.exec_module  # back to the loader's own method
            except AttributeError:
                pass
            self._fire(fullname, module)

        loader.exec_module = exec_module
        return spec

    def _fire(self, fullname: str, module: ModuleType) -> None:
        for callback in self.callbacks.pop(fullname, []):
            _run(callback, module)
        if not self.callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)


def _run(callback: Callback, module: ModuleType) -> None:
    try:
        callback(module)
    except Exception as exc:  # a failed registration must not break the user's import of that module
        warnings.warn(
            f"hfx could not register itself with {module.__name__}: {type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )


_FINDER = _AfterImportFinder()


def when_imported(module_name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once ``module_name`` is imported: now if it is, else right after its import."""
    module = sys.modules.get(module_name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        _run(callback, module)
        return
    _FINDER.callbacks.setdefault(module_name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def pending() -> list[str]:
    """Modules whose import still has hfx callbacks waiting on it (for tests and ``hfx plugins``)."""
    return sorted(_FINDER.callbacks)


__all__ = ["pending", "when_imported"]
