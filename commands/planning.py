"""`qcache plan`: what `qcache extract` with the same options will need (torch only when it runs)."""

from __future__ import annotations

from typing import Any

import click

from .extract_options import attributions_option, ig_options, run_options
from .extraction import extract_config
from .options import clean_errors, examples, store_option
from .output import emit_record, format_option


@click.command(
    "plan",
    epilog=examples(
        "qcache plan --model llama2-7b --bits 4 --dataset boolq --with-passage",
        "qcache plan --model smollm2-135m --bits 8 --limit 64 --device cpu --calibrate",
        "qcache plan --model opt-6.7b --layers all --tap act,resid --format json",
    ),
)
@run_options
@attributions_option
@ig_options
@click.option(
    "--calibrate",
    is_flag=True,
    help="Load the model at --bits on the device and time one real forward batch (and one IG step chunk "
    "with --attributions), synchronized, for the speed; a single Linear when the weights are not here.",
)
@format_option("A readable table, JSON, or CSV rows of field,value (nested fields joined by dots).")
@store_option
@clean_errors
def plan(store_path: str, calibrate: bool, fmt: str, **opts: Any) -> None:
    """Print the disk, memory and time an extraction will need, and whether it fits, before it starts."""
    from qcache.extract.plan.estimate import plan_extract
    from qcache.extract.plan.table import render

    cfg = extract_config(store_path, opts, click.get_current_context())
    result = plan_extract(cfg, measure=calibrate)
    emit_record(fmt, result.to_dict(), text=lambda: render(result))
