"""Where the store keeps what is not array data, so that its Zarr hierarchy holds nothing else.

Schema 2 (docs/store.md)::

    <root>/zarr.json                       the root group
    <root>/runs/zarr.json, runs/<dataset>/zarr.json, runs/<dataset>/<model>/zarr.json    groups
    <root>/runs/<dataset>/<model>/<quant>/ a run: Zarr groups and arrays only (writer.py)
    <root>/_qcache/zarr.json               a placeholder array standing for qcache's own files below it:
    <root>/_qcache/locks/                      create.lock, <dataset>--<model>--<quant>.lock
    <root>/_qcache/runs/<d>/<m>/<q>/           _created, _progress/, _predictions/, .shard-<i>-of-<n>.lock
    <root>/tables/zarr.json                a placeholder array likewise; tables/<name>/*.parquet below it

Why placeholder arrays (0-d, no chunk): zarr-python walks a group by listing its directory and warns about
every entry that is not a Zarr node (``zarr.core.group._iter_members``), but never lists inside an array. So
``zarr.open_group(store).members(max_depth=None)`` and ``xr.open_datatree(store, engine="zarr")`` see every
array and warn about nothing; the two placeholders show up as scalars whose ``qcache`` attribute says what
the directory holds.

Schema 1 stores (written before) keep each run's bookkeeping inside its run directory. Such runs are read
and resumed where they are (``run_files``), and ``migrate.py`` moves them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .keys import RunKey
from .location import StorePath
from .progress import atomic_write

BOOKKEEPING = "_qcache"
TABLES = "tables"
CREATED = "_created"  # written last when a run is created: a run without it is not a run yet

NOTES = {
    BOOKKEEPING: "not array data: qcache's bookkeeping (run creation records, unit commit markers, "
    "per-unit predictions parts, locks) lives in this directory; read runs with qcache.store",
    TABLES: "not array data: qcache's result tables live in this directory as Parquet files "
    "(tables/<name>/*.parquet); query them with `qcache sql`",
}


def group_metadata(attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Zarr v3 group's ``zarr.json``."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def placeholder_metadata(note: str) -> dict[str, Any]:
    """A Zarr v3 ``zarr.json`` of a 0-d uint8 array with no chunk (it reads as its fill value 0) whose
    ``qcache`` attribute is ``note``. 0-d, so it adds no dimension to the groups below it in xarray."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": []}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}],
        "dimension_names": [],
        "attributes": {"qcache": note},
        "storage_transformers": [],
    }


def ensure_node(directory: StorePath, meta: dict[str, Any]) -> None:
    """Write ``directory/zarr.json`` unless it exists (atomically where local; one PUT on an object store)."""
    target = directory / "zarr.json"
    if target.exists():
        return
    data = json.dumps(meta, indent=2).encode()
    if isinstance(target, Path):
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)
    else:
        target.write_bytes(data)


def ensure_placeholder(root: StorePath, name: str) -> None:
    """Make ``<root>/<name>`` (``_qcache`` or ``tables``) a placeholder array: Zarr does not look inside."""
    ensure_node(root / name, placeholder_metadata(NOTES[name]))


def ensure_levels(root: Path, key: RunKey) -> None:
    """The groups between the root and run ``key`` (``runs/``, its dataset, its model), where missing."""
    for level in ("runs", f"runs/{key.dataset}", f"runs/{key.dataset}/{key.model}"):
        ensure_node(root / level, group_metadata())


def bookkeeping_dir(root: StorePath, key: RunKey) -> StorePath:
    """Where a schema-2 run keeps its files: ``<root>/_qcache/runs/<dataset>/<model>/<quant>``."""
    return root / BOOKKEEPING / key.path


def run_files(root: StorePath, key: RunKey) -> StorePath:
    """The directory holding run ``key``'s ``_created``, ``_progress/`` and ``_predictions/``: the run
    directory itself for a run written before schema 2 (it has ``_created`` there), else
    ``bookkeeping_dir``."""
    legacy = root / key.path
    return legacy if (legacy / CREATED).exists() else bookkeeping_dir(root, key)


def locks_dir(root: Path) -> Path:
    """``<root>/_qcache/locks``; the placeholder is written first: no walker ever meets a bare directory."""
    ensure_placeholder(root, BOOKKEEPING)
    return root / BOOKKEEPING / "locks"


def created_markers(root: StorePath) -> list[StorePath]:
    """The ``_created`` file of every run, schema 2 and schema 1 alike."""
    found = list(root.glob(f"{BOOKKEEPING}/runs/*/*/*/{CREATED}"))
    return found + list(root.glob(f"runs/*/*/*/{CREATED}"))
