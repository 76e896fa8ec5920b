"""qcache: cache LLM activations at several quantizations, analyze them offline.

From Python (docs/python.md): ``s = qcache.open("qcache-store")``, ``run = s.run("boolq/smollm2-135m/nf4")``,
``run.dataarray(15)``, ``qcache.compare(run_a, run_b, 15)``. Those names load on first use, so that
``import qcache`` (and the command line) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Run", "Store", "compare", "open"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
