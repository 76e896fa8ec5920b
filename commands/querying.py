"""`qcache sql` and `qcache report`: read the result tables."""

from __future__ import annotations

import click

from .analysis import log
from .options import clean_errors, examples, results_option, store_option
from .output import Table, emit, format_option


@click.command(
    epilog=examples(
        'qcache sql "SELECT quant, layer, n_dead FROM dead_neurons ORDER BY quant, layer"',
        "qcache sql --format csv \"SELECT * FROM metrics WHERE metric = 'accuracy'\"",
        "qcache sql --store s3://bucket/qcache-store --results ./results --format json "
        '"SELECT * FROM predictions LIMIT 5"',
    )
)
@click.argument("query")
@format_option()
@store_option
@results_option
@clean_errors
def sql(store_path: str, results: str | None, query: str, fmt: str) -> None:
    """Run a read-only SQL query over the result tables (DuckDB), e.g. SELECT * FROM metrics.

    Beside the tables, the views runs (one row per run), examples (prompt text, gold) and tokens (token
    strings per position) show what the store holds.
    """
    from qcache.store import open_store
    from qcache.store.tables import run_sql

    store = open_store(store_path, results=results)  # a clear error when it is not a store
    columns, rows = run_sql(store.results, query, store=store)
    emit(fmt, Table(list(columns), [dict(zip(columns, r, strict=True)) for r in rows]))


@click.command(
    epilog=examples(
        "qcache report",
        "qcache report --analyze --out qcache-report",
        "qcache report --store s3://bucket/qcache-store --results ./results --reading authors",
    )
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="qcache-report",
    show_default=True,
    help="Output directory: report.html, figures/*.png, tables/*.csv.",
)
@click.option(
    "--reading",
    type=click.Choice(["paper", "authors"]),
    default="paper",
    show_default=True,
    help="Answer reading of the calibration figures (both are in the CSVs).",
)
@click.option(
    "--analyze",
    "run_analyses",
    is_flag=True,
    help="First run the analyses whose tables are missing or out of date (calibration, dead, redundancy, "
    "salience, drift, overlaps).",
)
@store_option
@results_option
@clean_errors
def report(store_path: str, results: str | None, out_dir: str, reading: str, run_analyses: bool) -> None:
    """Write a self-contained HTML report of the store (the paper's figures and tables, plus overlaps and
    activation drift), every figure as PNG and every table as CSV."""
    from pathlib import Path

    from qcache.analyze.report import ReportConfig, build_report
    from qcache.store import open_store

    store = open_store(store_path, results=results)
    cfg = ReportConfig(store=store, out=Path(out_dir), reading=reading, analyze=run_analyses)
    path = build_report(cfg, log=log)
    click.echo(f"report written to {path} (figures/ and tables/ beside it)")
