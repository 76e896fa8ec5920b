"""qcache's errors, for ``except`` clauses: ``qcache.errors.RunNotFound`` is
``qcache.store.errors.RunNotFound``.

Every failure a caller can cause raises a subclass of ``QCacheError`` that also inherits the matching
built-in (store/errors.py has the hierarchy and what each means).
"""

from __future__ import annotations

from .store.errors import (
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

__all__ = [
    "BackendUnavailable",
    "DataError",
    "IncompleteRun",
    "InvalidName",
    "InvalidOption",
    "NotStored",
    "QCacheError",
    "RunBusy",
    "RunMismatch",
    "RunNotFound",
    "SQLError",
    "ShardFailed",
    "StoreError",
]
