"""The store root: one Zarr v3 hierarchy holding every run, plus the result tables beside it.

Layout (docs/design/store.md has the full picture)::

    <root>/zarr.json                         root group; attrs["qcache"] = {"schema": 1}
    <root>/runs/<dataset>/<model>/<quant>/   one group per run (see writer.py)
    <root>/tables/<name>/*.parquet           analysis results, queried by DuckDB
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import zarr

from .errors import RunNotFound, StoreError
from .keys import RunKey
from .manifest import SCHEMA_VERSION

ROOT_ATTR = "qcache"
CREATED = "_created"


def default_store_path() -> Path:
    return Path(os.environ.get("QCACHE_STORE", "qcache-store"))


class Store:
    """A qcache store on the local filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    def run_dir(self, key: RunKey) -> Path:
        return self.root / key.path

    def runs(self) -> list[RunKey]:
        """Every run whose creation finished, sorted."""
        found = []
        for marker in self.root.glob(f"runs/*/*/*/{CREATED}"):
            quant_dir = marker.parent
            found.append(RunKey(quant_dir.parent.parent.name, quant_dir.parent.name, quant_dir.name))
        return sorted(found)

    def run(self, key: RunKey | str):  # -> Run (import below avoids a cycle)
        from .reader import Run

        key = RunKey.parse(key) if isinstance(key, str) else key
        if not (self.run_dir(key) / CREATED).exists():
            have = ", ".join(str(k) for k in self.runs()) or "none"
            raise RunNotFound(f"no run {key} in store {self.root} (runs here: {have}); see `qcache ls`")
        return Run(self, key)

    def select(
        self,
        *,
        dataset: str | None = None,
        model: str | None = None,
        quant: str | None = None,
    ) -> list[RunKey]:
        """Runs matching the given filters (None matches all)."""
        return [
            k
            for k in self.runs()
            if (dataset is None or k.dataset == dataset)
            and (model is None or k.model == model)
            and (quant is None or k.quant == quant)
        ]


def open_store(path: str | os.PathLike[str] | None = None, *, create: bool = False) -> Store:
    """Open (or with ``create=True`` make) the store at ``path`` and check it really is one.

    >>> import tempfile; s = open_store(tempfile.mkdtemp() + "/s", create=True); s.runs()
    []
    """
    root = Path(path) if path is not None else default_store_path()
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {root} is a file, not a directory: pass --store with a directory")
    meta = root / "zarr.json"
    if meta.exists():
        _check_root(root, meta)
        if create and not os.access(root, os.W_OK):
            raise StoreError(f"store {root} is read-only: choose a writable --store or fix permissions")
        return Store(root)
    if not create:
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root} is not a qcache store (no zarr.json with qcache attributes)")
        raise StoreError(f"no store at {root}: run `qcache extract --store {root} ...` first")
    if root.exists() and any(root.iterdir()):
        raise StoreError(
            f"{root} is not empty and is not a qcache store: pick an empty or new directory for --store"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(root), mode="w", zarr_format=3)
        group.attrs[ROOT_ATTR] = {"schema": SCHEMA_VERSION}
    except PermissionError as exc:
        raise StoreError(f"cannot create store at {root}: {exc.strerror}; choose a writable --store") from exc
    except OSError as exc:
        raise StoreError(f"cannot create store at {root}: {exc.strerror or exc}") from exc
    return Store(root)


def _check_root(root: Path, meta: Path) -> None:
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError) as exc:
        raise StoreError(
            f"{root} has an unreadable zarr.json ({exc}); it is not a usable qcache store"
        ) from exc
    info = attrs.get(ROOT_ATTR)
    if not isinstance(info, dict) or "schema" not in info:
        raise StoreError(f"{root} is a Zarr hierarchy but not a qcache store (no 'qcache' attributes)")
    if int(info["schema"]) < 1:
        raise StoreError(
            f"store {root} has schema version {info['schema']}, from a pre-release qcache this version "
            "cannot read: re-extract into a new store"
        )
    if int(info["schema"]) > SCHEMA_VERSION:
        raise StoreError(
            f"store {root} has schema version {info['schema']}, newer than this qcache reads "
            f"({SCHEMA_VERSION}): upgrade qcache"
        )
