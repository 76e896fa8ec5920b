"""`qcache migrate`: bring a store written by an earlier qcache to the current layout."""

from __future__ import annotations

import sys

import click

from .options import clean_errors, examples, store_option


@click.command(
    epilog=examples(
        "qcache migrate --store qcache-store",
        "qcache migrate --store /data/old-store",
    )
)
@store_option
@clean_errors
def migrate(store_path: str) -> None:
    """Upgrade a store in place to the current layout (schema 2); safe to rerun, data untouched.

    Arrays gain dimension names, every level above the runs becomes a Zarr group and each run's
    bookkeeping moves out of its group, so `zarr.open_group` and `xarray.open_datatree` read the store
    without warnings. Older stores also open without it; token strings cannot be added to their runs.
    """
    from qcache.store import open_store
    from qcache.store.migrate import migrate_store

    report = migrate_store(open_store(store_path), log=lambda m: click.echo(m, err=True))
    for run in report.moved:
        click.echo(f"{run}: bookkeeping moved to _qcache/runs/{run}")
    click.echo(
        f"migrated {store_path}: {len(report.moved)} run(s) moved, {report.arrays_named} array(s) given "
        f"dimension names, {report.removed_locks} old lock file(s) removed"
        + (f"; {len(report.busy)} run(s) busy, not migrated" if report.busy else "")
    )
    if report.busy:
        sys.exit(1)
