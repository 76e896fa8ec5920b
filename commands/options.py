"""Options and error handling shared by every command."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from qcache.store.errors import QCacheError
from qcache.store.store import default_store_path


def store_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--store PATH|URL`` (default ``$QCACHE_STORE`` or ``./qcache-store``)."""
    return click.option(
        "--store",
        "store_path",
        default=lambda: str(default_store_path()),
        show_default="$QCACHE_STORE or ./qcache-store",
        help="Store directory, or URL to read (s3://, gs://, http(s)://, memory://, file://).",
    )(f)


def results_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--results DIR``: result tables somewhere other than the store (e.g. beside a read-only URL)."""
    return click.option(
        "--results",
        default=None,
        help="Directory or URL holding the result tables (default: the store); use a local directory "
        "to analyze a read-only store.",
    )(f)


def clean_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ``QCacheError`` into one line on stderr and its exit code, never a traceback."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except QCacheError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: committed units are kept; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


def stacked(options: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One decorator applying ``options`` in order, the first shown first in ``--help``."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f

    return apply
