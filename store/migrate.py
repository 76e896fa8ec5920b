"""Upgrade a schema-1 store in place to schema 2, so Zarr readers and xarray see it as they see a new one.

Nothing of a run's data changes: its arrays gain ``dimension_names``, the levels above it become groups, and
its bookkeeping moves out of its group to ``_qcache/runs/...`` (bookkeeping.py). Token strings and prompts
cannot be added (that needs the tokenizer): such runs keep reading without them.

The move is safe against a crash at any point: the bookkeeping is copied first, then the run's old
``_created`` is deleted (one unlink: from then on ``run_files`` finds the copy), then the old files go.
Run again after a crash, it finishes the job. Each run is migrated under the store's create lock and its
own writers lock, so no qcache of schema 2 writes it meanwhile; a run being written is skipped and named.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bookkeeping import (
    BOOKKEEPING,
    CREATED,
    TABLES,
    bookkeeping_dir,
    ensure_levels,
    ensure_placeholder,
    locks_dir,
)
from .creation import TOKEN_COORDINATES, width_dim
from .keys import RunKey
from .progress import atomic_write, fsync_tree
from .store import Store, upgrade_root
from .writer import locked, writers_lock

LEGACY_FILES = ("_progress", "_predictions")  # directories a schema-1 run keeps beside _created
AXES = {"tokens": ("token",), "examples": ("example",)}


@dataclass
class MigrationReport:
    moved: list[str] = field(default_factory=list)  # runs whose bookkeeping moved out of their group
    busy: list[str] = field(default_factory=list)  # runs skipped because a process is writing them
    arrays_named: int = 0  # arrays that gained dimension_names
    removed_locks: int = 0  # schema-1 lock files removed from runs/


def migrate_store(store: Store, log: Callable[[str], None] = print) -> MigrationReport:
    """Bring ``store`` (a local directory) to schema 2; idempotent. Raises ``StoreError`` for a URL."""
    root = store.local_root
    report = MigrationReport()
    with locked(locks_dir(root) / "create.lock", wait=True):
        if (root / TABLES).is_dir():
            ensure_placeholder(root, TABLES)
        for key in store.runs():
            ensure_levels(root, key)
            try:
                with locked(writers_lock(store, key), wait=False):
                    report.arrays_named += _name_dimensions(root / key.path)
                    if _move_bookkeeping(root, key):
                        report.moved.append(str(key))
            except BlockingIOError:
                report.busy.append(str(key))
                log(f"{key}: being written by another process; run `qcache migrate` again when it is done")
        report.removed_locks = _remove_legacy_locks(root)
        _remove_empty_dirs(root / BOOKKEEPING / "migrating")  # the staging directories' empty parents
        if not report.busy:
            upgrade_root(root)
    return report


def _remove_empty_dirs(top: Path) -> None:
    """Remove ``top`` and the directories below it that hold no file (deepest first); keep any with one."""
    if not top.is_dir():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: a file left there is kept
            d.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def _name_dimensions(run_dir: Path) -> int:
    """Give every array of a run its ``dimension_names`` and mark the token index as coordinates."""
    named = 0
    for meta_path in sorted(run_dir.rglob("zarr.json")):
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        rel = meta_path.parent.relative_to(run_dir).as_posix()
        if meta.get("node_type") == "group":
            if rel == "tokens" and "coordinates" not in meta.get("attributes", {}):
                meta.setdefault("attributes", {})["coordinates"] = TOKEN_COORDINATES
                atomic_write(meta_path, json.dumps(meta, indent=2).encode())
            continue
        if meta.get("dimension_names"):
            continue
        top = rel.split("/", 1)[0]
        dims = AXES.get(top) or ("token", width_dim(rel))
        if len(dims) != len(meta.get("shape", [])):
            continue  # not an array qcache wrote: leave it as it is
        meta["dimension_names"] = list(dims)
        atomic_write(meta_path, json.dumps(meta, indent=2).encode())
        named += 1
    return named


def _move_bookkeeping(root: Path, key: RunKey) -> bool:
    """Move a schema-1 run's ``_created``, ``_progress/``, ``_predictions/`` out of its group; False when
    there was nothing to move. Clears what a crashed earlier move left in the group."""
    old, new = root / key.path, bookkeeping_dir(root, key)
    if (old / CREATED).exists():
        staging = root / BOOKKEEPING / "migrating" / key.path  # outside runs/, where no glob lists it
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        for name in LEGACY_FILES:
            if (old / name).exists():
                shutil.copytree(old / name, staging / name)
        shutil.copy2(old / CREATED, staging / CREATED)
        fsync_tree(staging)
        if new.exists():  # a schema-2 directory with no run in it (the legacy _created still counted)
            shutil.rmtree(new)
        new.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, new)
        (old / CREATED).unlink()  # the switch: run_files now finds the copy
        moved = True
    elif (new / CREATED).exists():
        moved = False
    else:
        return False
    for name in LEGACY_FILES:
        if (old / name).exists():
            shutil.rmtree(old / name)
    for lock in old.glob(".shard-*-of-*.lock"):
        _remove_if_free(lock)
    return moved


def _remove_legacy_locks(root: Path) -> int:
    """Delete ``runs/.create.lock`` and ``runs/.locks/*.lock`` that no process holds (schema 1's places)."""
    removed = 0
    candidates = [root / "runs" / ".create.lock", *sorted((root / "runs" / ".locks").glob("*.lock"))]
    for path in candidates:
        removed += _remove_if_free(path)
    legacy = root / "runs" / ".locks"
    if legacy.is_dir() and not any(legacy.iterdir()):
        legacy.rmdir()
    return removed


def _remove_if_free(path: Path) -> int:
    """Delete lock file ``path`` unless another process holds it; 1 when deleted."""
    if not path.exists():
        return 0
    with contextlib.suppress(BlockingIOError), locked(path, wait=False):
        path.unlink()
        return 1
    return 0
