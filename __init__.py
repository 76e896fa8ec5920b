"""qcache: cache LLM activations at several quantizations, analyze them offline.

From Python (docs/python.md): ``s = qcache.open("qcache-store")``, ``run = s.run("boolq/smollm2-135m/nf4")``,
``run.dataarray(15)``, ``qcache.compare(run_a, run_b, 15)``; errors are ``qcache.errors`` (also
``qcache.store.QCacheError`` ...). Those names load on first use, so that ``import qcache`` (and the command
line) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Run", "Store", "compare", "open"]
_SUBMODULES = ("store", "errors")


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    if name in _SUBMODULES:  # qcache.store.QCacheError, qcache.errors.RunNotFound after `import qcache`
        import importlib

        return importlib.import_module(f"qcache.{name}")
    raise AttributeError(f"module 'qcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__, *_SUBMODULES])
