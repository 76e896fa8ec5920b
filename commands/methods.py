"""`qcache methods`: the quantization methods, and whether each can run here."""

from __future__ import annotations

import json

import click

from .options import clean_errors


@click.command("methods")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Check availability on cpu, cuda, or auto (this machine).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="A readable table, or JSON.",
)
@clean_errors
def methods(device: str, fmt: str) -> None:
    """List the quantization methods: run key, bits, kind, emulated or real kernel, settings, and whether
    each runs here (or why not). Use a key with `qcache extract --quant KEY`."""
    from qcache.extract.quant.registry import listing

    rows = listing(device)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    head = f"{'key':<20} {'bits':>4}  {'kind':<17} {'kernel':<8} {'IG':<3} {'settings':<34}"
    click.echo(f"{head} here ({rows[0]['device']})")
    for r in rows:
        here = "yes" if r["unavailable"] is None else f"no: {r['unavailable']}"
        options = ", ".join(o.split("/")[0] for o in r["options"]) or "-"
        ig = "yes" if r["gradients"] else "no"
        click.echo(
            f"{r['key']:<20} {r['bits']:>4}  {r['kind']:<17} {r['kernel']:<8} {ig:<3} {options:<34} {here}"
        )
