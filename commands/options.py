"""Options, help and error handling shared by every command.

- ``store_option``, ``results_option``: where the store and the result tables are.
- ``clean_errors``: a ``QCacheError`` becomes one line and its exit code; Ctrl-C exits 130.
- ``stacked``: several options as one decorator.
- ``renamed``: an option's earlier spelling kept working, hidden from ``--help``.
- ``CommaChoice``: a choice option that also takes comma lists (``--tap act,down-in``).
- ``examples``: the ``Examples:`` section every command's ``--help`` ends with (tests/test_cli_format.py
  parses each example against the command's options).
- Printing data in ``--format table|json|csv``: see output.py.
"""

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


def renamed(old: str, new: str, type: Any = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Accept ``old`` (e.g. ``--threshold``) as a hidden alias of the option whose parameter is ``new``.

    Apply it above the new option's decorator. Giving both spellings is a usage error.
    """
    alias = f"renamed_{new}"

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(alias)
            if value is not None:
                ctx = click.get_current_context()
                if ctx.get_parameter_source(new) is not click.core.ParameterSource.DEFAULT:
                    flag = next(p.opts[0] for p in ctx.command.params if p.name == new)
                    raise click.UsageError(f"{old} is the old spelling of {flag}: give only one of them")
                kwargs[new] = value
            return f(*args, **kwargs)

        return click.option(old, alias, type=type, default=None, hidden=True, help="Old spelling.")(wrapper)

    return decorate


class CommaChoice(click.Choice):
    """A ``click.Choice`` whose value may also be a comma list, ``act,down-in``; gives a tuple of choices.

    With ``multiple=True`` the option's value is a tuple of such tuples: ``flat`` joins them.
    """

    name = "choice-list"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        parts = [str(p).strip() for p in value] if isinstance(value, tuple | list) else str(value).split(",")
        return tuple(super(CommaChoice, self).convert(p.strip(), param, ctx) for p in parts if p.strip())

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(str(c) for c in self.choices) + "][,...]"


def flat(values: tuple[tuple[str, ...], ...] | tuple[str, ...]) -> tuple[str, ...]:
    """The choices of a repeated ``CommaChoice`` option in order, each once."""
    out: list[str] = []
    for v in values:
        for x in (v,) if isinstance(v, str) else v:
            if x not in out:
                out.append(x)
    return tuple(out)


def layer_list(text: str) -> tuple[int, ...]:
    """``--layers 1,15,30`` as a tuple of ints; a usage error otherwise."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"--layers {text!r} is not a comma list like 1,15,30") from None


def examples(*lines: str) -> str:
    """An epilog listing real command lines, kept as written by click's help formatter (``\\b``)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def stacked(options: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One decorator applying ``options`` in order, the first shown first in ``--help``."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f

    return apply
