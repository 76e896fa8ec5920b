"""`qcache ls`, `qcache verify`, `qcache models`: what a store and the registry hold."""

from __future__ import annotations

import sys

import click

from .options import clean_errors, examples, store_option
from .output import Table, emit, format_option


@click.command(
    "ls",
    epilog=examples(
        "qcache ls",
        "qcache ls --store s3://bucket/qcache-store --format json",
        "qcache ls --format csv --ig-rtol 0.01",
    ),
)
@format_option()
@click.option(
    "--ig-rtol",
    type=float,
    default=0.05,
    show_default=True,
    help="Attributions: count examples with |delta| > rtol*|F(x)-F(x;a0)| + 1e-3 as unconverged.",
)
@store_option
@clean_errors
def ls_command(store_path: str, fmt: str, ig_rtol: float) -> None:
    """What is cached: dataset/model/quant/layer, shape, dtype, progress, size, IG convergence."""
    from qcache.store import open_store
    from qcache.store.listing import describe_store

    store = open_store(store_path)
    rows = describe_store(store, ig_rtol=ig_rtol)
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every row's fields, in first-seen order
    emit(fmt, Table(columns, rows), text=lambda: _ls_text(store_path, rows))
    hint = store.migrate_hint()
    if hint is not None:  # on stderr: --format json/csv output stays data only
        click.echo(hint, err=True)


def _ls_text(store_path: str, rows: list[dict]) -> str:
    """``qcache ls``'s readable table: one line per cached array."""
    if not rows:
        return f"store {store_path} holds no runs yet"
    w = max(13, *(len(r["array"]) for r in rows))  # MoE layers: experts/activations, router/topk_ids
    header = f"{'dataset/model/quant':<40} {'layer':>5} {'array':<{w}} {'shape':<16} {'dtype':<8}"
    lines = [f"{header} {'done':>7} {'MiB':>9}"]
    for r in rows:
        run = f"{r['dataset']}/{r['model']}/{r['quant']}"
        shape = "x".join(str(x) for x in r["shape"])
        lines.append(
            f"{run:<40} {r['layer']:>5} {r['array']:<{w}} {shape:<16} {r['dtype']:<8} "
            f"{100 * r['progress']:>6.1f}% {r['size_mb']:>9.2f}"
            + (f"  IG unconverged {r['ig_unconverged']}/{r['ig_examples']}" if "ig_examples" in r else "")
        )
    return "\n".join(lines)


@click.command(
    epilog=examples(
        "qcache verify",
        "qcache verify --store /data/qcache-store --repair",
    )
)
@click.option("--repair", is_flag=True, help="Withdraw damaged units so `qcache extract` recomputes them.")
@store_option
@clean_errors
def verify(store_path: str, repair: bool) -> None:
    """Check a store: chunks decode, checksums match, shapes and manifests agree."""
    from qcache.store import open_store
    from qcache.store.verify import verify_store

    s = open_store(store_path)
    report = verify_store(s, repair=repair)
    for p in report.problems:
        unit = f" (unit {p.unit})" if p.unit is not None else ""
        click.echo(f"DAMAGED {p.run} {p.where}{unit}: {p.what}", err=True)
    for run, unit in report.repaired:
        click.echo(f"withdrew {run} unit {unit}: rerun its extraction command to recompute it", err=True)
    bad_runs = sorted({p.run for p in report.problems})
    for run in bad_runs:
        cmd = s.run(run).manifest.get("command", "qcache extract ...")
        hint = "recompute with" if report.repaired else "run `qcache verify --repair`, then"
        click.echo(f"{run}: {hint}: {cmd}", err=True)
    click.echo(
        f"checked {report.runs_checked} runs, {report.units_checked} units: "
        f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}"
    )
    if not report.ok:
        sys.exit(1)


@click.command(epilog=examples("qcache models", "qcache models --format json"))
@format_option()
def models(fmt: str) -> None:
    """List the model aliases and the Hugging Face model each stands for."""
    from qcache.extract.models.registry import ALIASES

    rows = [{"alias": alias, "model": hub} for alias, hub in ALIASES.items()]
    emit(fmt, Table(["alias", "model"], rows))
