"""`qcache plan`: what `qcache extract` with the same options will need (torch only when it runs)."""

from __future__ import annotations

import json
from typing import Any

import click

from .extraction import attributions_option, extract_config, ig_options, run_options
from .options import clean_errors, store_option


@click.command("plan")
@run_options
@attributions_option
@ig_options
@click.option(
    "--calibrate",
    is_flag=True,
    help="Load the model at --bits on the device and time one real forward batch (and one IG step chunk "
    "with --attributions), synchronized, for the speed; a single Linear when the weights are not here.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="A readable table, or JSON.",
)
@store_option
@clean_errors
def plan(store_path: str, calibrate: bool, fmt: str, **opts: Any) -> None:
    """Print the disk, memory and time an extraction will need, and whether it fits, before it starts."""
    from qcache.extract.plan.estimate import plan_extract
    from qcache.extract.plan.table import render

    cfg = extract_config(store_path, opts, click.get_current_context())
    result = plan_extract(cfg, measure=calibrate)
    click.echo(json.dumps(result.to_dict(), indent=2) if fmt == "json" else render(result))
