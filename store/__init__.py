"""The store: the narrow waist between extraction and analysis.

>>> from qcache import store
>>> s = store.open("qcache-store")            # doctest: +SKIP
>>> run = s.run("boolq/smollm2-135m/nf4")     # doctest: +SKIP
>>> run.activations(15)                       # doctest: +SKIP
dask.array<from-zarr, shape=(12345, 1536), dtype=float16, ...>
"""

from .errors import QCacheError
from .keys import RunKey
from .layout import TokenLayout
from .reader import Run
from .store import Store, open_store
from .writer import ArraySpec, RunSpec, RunWriter

open = open_store

__all__ = [
    "ArraySpec",
    "QCacheError",
    "Run",
    "RunKey",
    "RunSpec",
    "RunWriter",
    "Store",
    "TokenLayout",
    "open",
    "open_store",
]
