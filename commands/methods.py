"""`qcache methods`: the quantization methods, and whether each can run here."""

from __future__ import annotations

import click

from .options import clean_errors, examples
from .output import Table, emit, format_option

COLUMNS = ["key", "bits", "kind", "kernel", "IG", "settings", "here"]


@click.command(
    "methods",
    epilog=examples(
        "qcache methods",
        "qcache methods --device cuda --format json",
        "qcache methods --device cpu --format csv",
    ),
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Check availability on cpu, cuda, or auto (this machine).",
)
@format_option()
@clean_errors
def methods(device: str, fmt: str) -> None:
    """List the quantization methods: run key, bits, kind, emulated or real kernel, settings, and whether
    each runs here (or why not). Use a key with `qcache extract --quant KEY`."""
    from qcache.extract.quant.registry import listing

    rows = listing(device)
    if fmt != "table":  # every field, as the registry gives it
        emit(fmt, Table(list(rows[0]), rows))
        return
    shown = [
        {
            "key": r["key"],
            "bits": r["bits"],
            "kind": r["kind"],
            "kernel": r["kernel"],
            "IG": "yes" if r["gradients"] else "no",
            "settings": ", ".join(o.split("/")[0] for o in r["options"]) or "-",
            "here": "yes" if r["unavailable"] is None else f"no: {r['unavailable']}",
        }
        for r in rows
    ]
    click.echo(f"methods on {rows[0]['device']}:")
    emit(fmt, Table(COLUMNS, shown))
