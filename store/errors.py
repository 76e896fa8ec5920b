"""The error hierarchy: every failure a user can cause is a ``QCacheError``.

Each subclass also inherits the matching built-in, so library callers can catch either. The CLI turns any
``QCacheError`` into one line on stderr and a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QCacheError(Exception):
    """Root of qcache's errors. The message says what went wrong, why, and how to fix it."""

    exit_code = 2


class InvalidName(QCacheError, ValueError):
    """A dataset, model or layer name that is unknown or cannot be used as a store key."""


class InvalidOption(QCacheError, ValueError):
    """An option value outside what qcache supports (e.g. ``--bits 3``)."""


class SQLError(QCacheError, ValueError):
    """A query DuckDB rejected, one that would write, or more than one statement (``qcache sql``)."""


class StoreError(QCacheError, OSError):
    """The store path cannot be used: not a qcache store, a file, read-only, full."""


class RunNotFound(QCacheError, LookupError):
    """No run under the requested key; the message lists what exists."""


class RunMismatch(QCacheError, ValueError):
    """An existing run was made with different arguments than this request."""


class RunBusy(QCacheError, RuntimeError):
    """Another process holds the lock on this run and shard."""


class NotStored(QCacheError, LookupError):
    """Something a run does not hold, e.g. token strings of a run extracted before qcache stored them."""


class IncompleteRun(QCacheError, RuntimeError):
    """A run that has not finished; analyses refuse it unless told to use what is there."""


class DataError(QCacheError, ValueError):
    """Input data that cannot be used: empty dataset, missing column, label outside the label set."""


class BackendUnavailable(QCacheError, RuntimeError):
    """A model, library or device that is needed but not reachable here (no network, no bitsandbytes)."""


class ShardFailed(QCacheError, RuntimeError):
    """A child extraction of a launched run exited non-zero; the other shards' committed units are kept."""

    exit_code = 1
