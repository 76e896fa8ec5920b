"""The store: the narrow waist between extraction and analysis.

>>> from qcache import store
>>> s = store.open("qcache-store")            # doctest: +SKIP
>>> run = s.run("boolq/smollm2-135m/nf4")     # doctest: +SKIP
>>> run.activations(15)                       # doctest: +SKIP
dask.array<from-zarr, shape=(12345, 1536), dtype=float16, ...>
"""

from . import errors
from .errors import (
    BackendUnavailable,
    DataError,
    IncompleteRun,
    InvalidName,
    InvalidOption,
    NotStored,
    QCacheError,
    RunBusy,
    RunMismatch,
    RunNotFound,
    ShardFailed,
    SQLError,
    StoreError,
)
from .keys import RunKey
from .layout import TokenLayout
from .reader import Run
from .store import Store, open_store
from .writer import ArraySpec, RunSpec, RunWriter

open = open_store

__all__ = [
    "ArraySpec",
    "BackendUnavailable",
    "DataError",
    "IncompleteRun",
    "InvalidName",
    "InvalidOption",
    "NotStored",
    "QCacheError",
    "Run",
    "RunBusy",
    "RunKey",
    "RunMismatch",
    "RunNotFound",
    "RunSpec",
    "RunWriter",
    "SQLError",
    "ShardFailed",
    "Store",
    "StoreError",
    "TokenLayout",
    "errors",
    "open",
    "open_store",
]
