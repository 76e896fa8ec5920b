"""Unit progress markers: a unit counts as done only after its data is durably on disk.

Order of a commit: zarr chunks written and fsynced, the predictions part written atomically, then the
marker written atomically. A crash anywhere before the marker's rename means the unit is redone; nothing
that is marked done can be missing or half written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .location import StorePath


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (POSIX-atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path`` (the chunk files of one unit) and the directories holding them."""
    if not path.exists():
        return
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


class Progress:
    """Done markers of one run, one small JSON file per unit under ``_progress/``."""

    def __init__(self, run_dir: StorePath) -> None:
        self.dir = run_dir / "_progress"

    def _marker(self, unit: int) -> StorePath:
        return self.dir / f"u{unit:07d}.done"

    def mark_done(self, unit: int, record: dict[str, Any]) -> None:
        marker = self._marker(unit)
        assert isinstance(marker, Path), "runs are written to local stores only"
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, json.dumps(record, sort_keys=True).encode())

    def done_units(self) -> set[int]:
        if not self.dir.exists():
            return set()
        return {int(p.name[1:8]) for p in self.dir.glob("u*.done")}

    def record(self, unit: int) -> dict[str, Any]:
        return json.loads(self._marker(unit).read_text())

    def clear(self, unit: int) -> None:
        self._marker(unit).unlink(missing_ok=True)
