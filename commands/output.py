"""How every command prints data: ``--format table|json|csv``, one decorator and one call.

A new command that prints data does two things::

    from .output import Table, emit, format_option

    @click.command()
    @format_option()                       # adds --format table|json|csv (and the hidden --json alias)
    @store_option
    @clean_errors
    def drift(store_path: str, fmt: str) -> None:
        rows = [...]                       # list of dicts, e.g. pyarrow's table.to_pylist()
        emit(fmt, Table(["layer", "neuron", "drift"], rows))

``emit`` takes one ``Table`` or a mapping of named tables (a command printing several, like
``qcache analyze all``), and optionally ``text``: a function giving the readable form when a command has a
better one than aligned columns (the pivot of ``qcache analyze salience``). ``emit_record`` prints one
nested record (``qcache plan``). What each format gives:

- ``table``: aligned columns with a header line, floats to 4 decimals; several tables one after another,
  each under its name. Meant for reading, not parsing.
- ``json``: a list of row objects; several tables: an object of such lists, keyed by name. Numbers keep
  full precision; NaN and infinities become ``null`` (JSON has no such numbers); dates are strings.
- ``csv``: RFC 4180 via the ``csv`` module, a header row, LF line ends (as DuckDB's and sqlite3's CLIs);
  several tables: one CSV with a first column ``table`` naming each row's table and the union of their
  columns (empty where a table lacks one). Lists in cells are written as JSON text.

``--json`` stays as a hidden alias of ``--format json`` (the spelling of earlier releases).
"""

from __future__ import annotations

import csv
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click

FORMATS = ("table", "json", "csv")


@dataclass(frozen=True)
class Table:
    """Rows to print: ``columns`` in order, each row a dict holding at least those keys.

    ``show`` maps a column to how the ``table`` format writes its cells (e.g. a shape as 4096x1536);
    json and csv always write the values themselves.
    """

    columns: list[str]
    rows: list[dict[str, Any]]
    show: dict[str, Callable[[Any], str]] = field(default_factory=dict)

    @classmethod
    def from_arrow(cls, table: Any, columns: list[str] | None = None) -> Table:
        """The ``columns`` (default: all) of a ``pyarrow.Table``."""
        columns = list(columns or table.column_names)
        return cls(columns, table.select(columns).to_pylist())


def format_option(help: str = "Output format: aligned columns to read, or JSON / CSV to parse.") -> Any:
    """``--format table|json|csv`` (passed to the command as ``fmt``) and the hidden alias ``--json``."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, fmt: str, as_json: bool, **kwargs: Any) -> Any:
            if as_json:
                given = click.get_current_context().get_parameter_source("fmt")
                if given is not click.core.ParameterSource.DEFAULT and fmt != "json":
                    raise click.UsageError(f"--json is short for --format json: drop it or --format {fmt}")
                fmt = "json"
            return f(*args, fmt=fmt, **kwargs)

        wrapper = click.option(
            "--json", "as_json", is_flag=True, hidden=True, help="Alias of --format json."
        )(wrapper)
        return click.option(
            "--format",
            "fmt",
            type=click.Choice(FORMATS),
            default="table",
            show_default=True,
            help=help + " (--json is short for --format json.)",
        )(wrapper)

    return decorate


def emit(fmt: str, data: Table | Mapping[str, Table], text: Callable[[], str] | None = None) -> None:
    """Print ``data`` on stdout in ``fmt``; ``text()``, when given, is the ``table`` format's output."""
    tables = {"": data} if isinstance(data, Table) else dict(data)
    if fmt == "json":
        out: Any = (
            _json_rows(data) if isinstance(data, Table) else {k: _json_rows(t) for k, t in tables.items()}
        )
        click.echo(json.dumps(out, indent=1, default=str, allow_nan=False))
    elif fmt == "csv":
        if isinstance(data, Table):
            _csv(data)
        else:
            _csv_many(tables)
    elif text is not None:
        click.echo(text())
    else:
        first = True
        for name, table in tables.items():
            if name:
                click.echo(("" if first else "\n") + f"{name}:")
            click.echo(aligned(table))
            first = False


def emit_record(fmt: str, record: Mapping[str, Any], text: Callable[[], str]) -> None:
    """Print one nested record: ``text()`` for table, the object for json, ``field,value`` rows for csv
    (nested keys joined with dots, list items by index: ``disk.arrays.0.path``)."""
    if fmt == "json":
        click.echo(json.dumps(_finite(record), indent=2, default=str, allow_nan=False))
    elif fmt == "csv":
        _csv(Table(["field", "value"], [{"field": k, "value": v} for k, v in _flatten(record)]))
    else:
        click.echo(text())


def aligned(table: Table) -> str:
    """The rows as left-aligned columns under a header line (two spaces between columns)."""
    cells = [[table.show.get(c, fmt_cell)(r.get(c)) for c in table.columns] for r in table.rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(table.columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(table.columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def fmt_cell(v: Any) -> str:
    """A cell of the ``table`` format: floats to 4 decimals, ``None`` as an empty cell."""
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _json_rows(table: Table) -> list[dict[str, Any]]:
    return [{c: _finite(r.get(c)) for c in table.columns} for r in table.rows]


def _finite(v: Any) -> Any:
    """``v`` with NaN and infinities as ``None``, inside lists and dicts too (JSON has no such numbers)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _csv_cell(v: Any) -> Any:
    return json.dumps(v, default=str) if isinstance(v, list | tuple | dict) else v


def _csv(table: Table) -> None:
    # LF line ends, as DuckDB's and sqlite3's CLIs write (the csv module's default is CRLF)
    writer = csv.writer(click.get_text_stream("stdout"), lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows([_csv_cell(r.get(c)) for c in table.columns] for r in table.rows)


def _csv_many(tables: Mapping[str, Table]) -> None:
    columns = ["table"]
    for t in tables.values():
        columns += [c for c in t.columns if c not in columns]
    rows = [{"table": name, **{c: r.get(c) for c in t.columns}} for name, t in tables.items() for r in t.rows]
    _csv(Table(columns, rows))


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple):
        items = list(enumerate(value))
    else:
        return [(prefix, value)]
    out: list[tuple[str, Any]] = []
    for k, v in items:
        out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out
