"""The store root: one Zarr v3 hierarchy holding every run, plus the result tables beside it.

Layout (docs/store.md has the full picture)::

    <root>/zarr.json                         root group; attrs["qcache"] = {"schema": 2}
    <root>/runs/<dataset>/<model>/<quant>/   one group per run, Zarr only (see writer.py)
    <root>/_qcache/                          the runs' bookkeeping, outside the arrays (bookkeeping.py)
    <root>/tables/<name>/*.parquet           analysis results, queried by DuckDB

Schema 1 stores (bookkeeping inside each run directory, no group metadata above the runs) are read as they
are; ``migrate.py`` upgrades them.

A store is read wherever it lives (a local directory or an fsspec URL, see location.py); runs are only
written to local directories, where file locks and fsync make commits safe.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from .bookkeeping import BOOKKEEPING, CREATED, created_markers, ensure_placeholder, run_files
from .errors import RunNotFound, StoreError
from .keys import RunKey
from .location import RemotePath, StorePath, local_dir, locate, remote_errors
from .manifest import SCHEMA_VERSION
from .progress import atomic_write

ROOT_ATTR = "qcache"


def creation_id(files: StorePath) -> str | None:
    """The random id written into ``_created`` when the run was created (None before ids existed);
    ``files`` is the run's bookkeeping directory (``bookkeeping.run_files``). Raises FileNotFoundError when
    the run has no ``_created``."""
    return json.loads((files / CREATED).read_text()).get("id")


def default_store_path() -> Path:
    return Path(os.environ.get("QCACHE_STORE", "qcache-store")).expanduser()


class Store:
    """A qcache store. ``results`` is where ``tables/`` lives: the store itself unless ``--results``."""

    def __init__(self, root: StorePath, results: StorePath | None = None) -> None:
        self.root = root
        self.results = results if results is not None else root

    @property
    def tables_dir(self) -> StorePath:
        return self.results / "tables"

    @property
    def local_root(self) -> Path:
        """The store's directory, for writing runs; a remote store cannot take them."""
        return local_dir(self.root)

    def run_dir(self, key: RunKey) -> StorePath:
        """The run's Zarr group."""
        return self.root / key.path

    def files_dir(self, key: RunKey) -> StorePath:
        """The run's bookkeeping directory (``_created``, ``_progress/``, ``_predictions/``)."""
        return run_files(self.root, key)

    def has_run(self, key: RunKey) -> bool:
        """Whether run ``key``'s creation finished."""
        return bool((self.files_dir(key) / CREATED).exists())

    def runs(self) -> list[RunKey]:
        """Every run whose creation finished, sorted."""
        try:
            markers = created_markers(self.root)
        except FileNotFoundError:  # some remote file systems raise on a glob below a missing directory
            markers = []
        found = set()
        for marker in markers:
            quant_dir = marker.parent
            found.add(RunKey(quant_dir.parent.parent.name, quant_dir.parent.name, quant_dir.name))
        return sorted(found)

    def run(self, key: RunKey | str):  # -> Run (import below avoids a cycle)
        from .reader import Run

        key = RunKey.parse(key) if isinstance(key, str) else key
        if not self.has_run(key):
            have = ", ".join(str(k) for k in self.runs()) or "none"
            raise RunNotFound(f"no run {key} in store {self.root} (runs here: {have}); see `qcache ls`")
        return Run(self, key)

    def unmigrated(self) -> list[RunKey]:
        """Runs written by a qcache of schema 1 and not migrated: their bookkeeping files still sit inside
        their Zarr group, which plain zarr walks warn about and ``xarray.open_datatree`` refuses."""
        return [k for k in self.runs() if (self.run_dir(k) / CREATED).exists()]

    def migrate_hint(self) -> str | None:
        """One line telling to run ``qcache migrate`` when some run is of schema 1 (``unmigrated``)."""
        old = self.unmigrated()
        if not old:
            return None
        n = f"{len(old)} run{'s' if len(old) > 1 else ''} {'were' if len(old) > 1 else 'was'}"
        return (
            f"note: {n} written by an older qcache (schema 1): `qcache migrate --store {self.root}` makes "
            "them readable by plain zarr/xarray"
        )

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


def open_store(
    path: str | os.PathLike[str] | RemotePath | Store | None = None,
    *,
    create: bool = False,
    results: str | os.PathLike[str] | None = None,
) -> Store:
    """Open (or with ``create=True`` make) the store at ``path`` (a directory or URL); check it is one.

    ``results`` moves the result tables elsewhere (e.g. a local directory beside a read-only remote store).

    >>> import tempfile; s = open_store(tempfile.mkdtemp() + "/s", create=True); s.runs()
    []
    """
    if isinstance(path, Store):
        return path if results is None else Store(path.root, locate(results))
    where = locate(path) if path is not None else default_store_path()
    out = locate(results) if results is not None else None
    if isinstance(where, RemotePath):
        if create:
            local_dir(where)  # raises: runs are written to local directories only
        _open_remote(where)
        return Store(where, out)
    return _open_local(where, create, out)


def _open_remote(root: RemotePath) -> None:
    # unreachable host, missing credentials, denied, missing bucket: one StoreError line (location.py)
    with remote_errors(root, "read store"):
        meta = root / "zarr.json"
        if not meta.exists():
            raise StoreError(f"no qcache store at {root} (no zarr.json there): check the URL")
        _check_root(root, meta)


def _open_local(root: Path, create: bool, results: StorePath | None) -> Store:
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {root} is a file, not a directory: pass --store with a directory")
    meta = root / "zarr.json"
    if not meta.exists():
        if not create:
            if root.exists() and any(root.iterdir()):
                raise StoreError(f"{root} is not a qcache store (no zarr.json with qcache attributes)")
            raise StoreError(f"no store at {root}: run `qcache extract --store {root} ...` first")
        if root.exists() and any(root.iterdir()) and not meta.exists():  # (another creator may have won)
            raise StoreError(
                f"{root} is not empty and is not a qcache store: pick an empty or new directory for --store"
            )
        _create_root(root)
    _check_root(root, meta)
    if create and not os.access(root, os.W_OK):
        raise StoreError(f"store {root} is read-only: choose a writable --store or fix permissions")
    return Store(root, results)


def _create_root(root: Path) -> None:
    """Write the root group's metadata in one atomic rename, so a concurrent reader or creator sees either
    no store or a whole one, and never deletes what another creator has begun (as zarr's mode "w" would)."""
    meta = {
        "attributes": {ROOT_ATTR: {"schema": SCHEMA_VERSION}},
        "zarr_format": 3,
        "consolidated_metadata": None,
        "node_type": "group",
    }
    # the temporary file lives beside the store, not in it: a racing creator must find the store either
    # empty or holding a whole zarr.json, never a stray file that makes it "not empty, not a store"
    tmp = root.parent / f".{root.name}.zarr.json.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(meta, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / "zarr.json")  # identical content if another creator got there first
        ensure_placeholder(root, BOOKKEEPING)
    except PermissionError as exc:
        raise StoreError(f"cannot create store at {root}: {exc.strerror}; choose a writable --store") from exc
    except OSError as exc:
        raise StoreError(f"cannot create store at {root}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _check_root(root: StorePath, meta: StorePath) -> None:
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except StoreError:  # a remote store that cannot be read at all (location.remote_errors)
        raise
    except (OSError, ValueError) as exc:
        raise StoreError(
            f"{root} has an unreadable zarr.json ({exc}); it is not a usable qcache store"
        ) from exc
    info = attrs.get(ROOT_ATTR)
    if not isinstance(info, dict) or "schema" not in info:
        above = _store_above(root)
        if above is not None:
            raise StoreError(
                f"{root} is a run (or part of one) inside the qcache store {above}: open {above}, then pick "
                "the run by its key (s.run('DATASET/MODEL/QUANT'), or --dataset/--model/--bits)"
            )
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


def _store_above(path: StorePath, levels: int = 8) -> StorePath | None:
    """The nearest directory above ``path`` (a few levels: runs/DATASET/MODEL/QUANT/layers/L001/...) whose
    zarr.json carries qcache's root attributes, else None. Local paths only."""
    if not isinstance(path, Path):
        return None
    for parent in list(path.resolve().parents)[:levels]:
        try:
            attrs = json.loads((parent / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue
        if isinstance(attrs.get(ROOT_ATTR), dict):
            return parent
    return None


def upgrade_root(root: Path) -> None:
    """Raise the root's schema to this qcache's (``SCHEMA_VERSION``) when it is older, keeping its other
    attributes. Called when a schema-2 run is added to a schema-1 store: a qcache of schema 1 would not see
    that run, so it must refuse the store rather than list it without the run."""
    meta_path = root / "zarr.json"
    meta = json.loads(meta_path.read_text())
    info = meta.setdefault("attributes", {}).setdefault(ROOT_ATTR, {})
    if int(info.get("schema", 0)) >= SCHEMA_VERSION:
        return
    info["schema"] = SCHEMA_VERSION
    atomic_write(meta_path, json.dumps(meta, indent=2).encode())
