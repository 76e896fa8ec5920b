"""Create a run's arrays up front, then fill them unit by unit, committing each unit durably.

A run group holds Zarr nodes only (every array with ``dimension_names``)::

    zarr.json                                 attrs["manifest"]: the manifest (manifest.py)
    tokens/{example_id,position,token_id}     (token,) int32, written at creation
    tokens/token                              (token,) string: each row's token string (token_text.py)
    examples/{start,length,gold,n_truncated,source_row}   (example,), written at creation
    examples/prompt                           (example,) string: the exact text each example's tokens encode
    layers/L<nnn>/<array>                     (token, neuron) or (token, hidden); NaN where not yet written

and its bookkeeping lives outside it (bookkeeping.py), in ``_qcache/runs/<dataset>/<model>/<quant>/``::

    _predictions/u<unit>.parquet   predictions of the examples each unit owns
    _progress/u<unit>.done         commit markers (progress.py)
    _created                       written last at creation: a run without it is not a run yet

A run created by a schema-1 qcache keeps those three inside its group directory and is resumed there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import signal
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .bookkeeping import CREATED, bookkeeping_dir, ensure_levels, locks_dir, run_files
from .creation import create_run, remove_run
from .errors import RunBusy, RunMismatch, RunNotFound, StoreError
from .keys import RunKey
from .layout import TokenLayout
from .manifest import SCHEMA_VERSION, check_same_run, fingerprint
from .progress import Progress, atomic_write, fsync_tree
from .store import Store, creation_id, upgrade_root


@dataclass(frozen=True)
class ArraySpec:
    """One (tokens, neurons) array of a run, e.g. ``layers/L001/activations``."""

    path: str
    n_neurons: int
    dtype: str  # numpy dtype name: float16 or float32


@dataclass(frozen=True)
class RunSpec:
    """Everything the store needs to lay out a run before the first forward pass."""

    key: RunKey
    manifest: dict[str, Any]
    layout: TokenLayout
    token_ids: np.ndarray  # (tokens,) int32
    gold: np.ndarray  # (examples,) int16, index into the dataset's label words
    n_truncated: np.ndarray  # (examples,) int32, tokens dropped from the front of long prompts
    arrays: tuple[ArraySpec, ...]
    source_rows: np.ndarray | None = None  # (examples,) row of each example in its dataset file
    token_strings: np.ndarray | None = None  # (tokens,) str: each row's token string; None: not stored
    prompts: Sequence[str] | None = None  # (examples,) the exact text each example's tokens encode


class RunWriter:
    """Writes units of one run. Obtain with ``RunWriter.open``."""

    def __init__(self, store: Store, spec: RunSpec) -> None:
        self.store = store
        self.spec = spec
        self.dir = store.local_root / spec.key.path
        self.files = run_files(store.local_root, spec.key)  # bookkeeping: _created, _progress/, _predictions/
        self.progress = Progress(self.files)
        self._arrays = {a.path: zarr.open_array(str(self.dir / a.path), mode="r+") for a in spec.arrays}
        self._created = _creation_id(self.files)  # which creation of the run this writer opened

    @classmethod
    def open(cls, store: Store, spec: RunSpec, *, overwrite: bool = False) -> RunWriter:
        """Create the run, or reopen it for resuming after checking the arguments match."""
        root = store.local_root
        run_dir = root / spec.key.path
        manifest = dict(spec.manifest, schema=SCHEMA_VERSION)
        manifest["fingerprint"] = fingerprint(manifest)
        with _storage_errors(f"creating {spec.key}"):
            create_lock = locks_dir(root) / "create.lock"
            with locked(create_lock, wait=True):
                files = run_files(root, spec.key)
                if overwrite and (run_dir.exists() or files.exists()):
                    try:  # never delete a run under a writer: it would go on writing into the new one
                        with locked(writers_lock(store, spec.key), wait=False):
                            remove_run(root, spec.key)
                    except BlockingIOError as exc:
                        raise RunBusy(
                            f"run {spec.key} is being written by another process; stop it before --overwrite"
                        ) from exc
                    files = run_files(root, spec.key)
                if (files / CREATED).exists():
                    _check_stored(run_dir, spec, manifest)
                else:
                    remove_run(root, spec.key)  # a creation that crashed before finishing: nothing counts
                    ensure_levels(root, spec.key)
                    upgrade_root(root)
                    create_run(run_dir, bookkeeping_dir(root, spec.key), spec, manifest)
        return cls(store, spec)

    @staticmethod
    def exists(store: Store, key: RunKey) -> bool:
        """Whether run ``key`` was created in ``store`` (a creation that crashed half-way does not count)."""
        return (run_files(store.local_root, key) / CREATED).exists()

    @staticmethod
    def check(store: Store, spec: RunSpec) -> set[int]:
        """The done units of the stored run of ``spec``, after the checks ``open`` makes before resuming it.

        Writes nothing: the extraction calls it before loading the weights, so a mismatch is reported at
        once; ``open`` checks again. Holds the creation lock while reading, as ``open`` does, so a run being
        recreated by ``--overwrite`` elsewhere is never read half-deleted. Raises ``RunMismatch`` (arguments
        or tokens differ) or ``RunNotFound`` (no such run).
        """
        root = store.local_root
        run_dir = root / spec.key.path
        with _storage_errors(f"reading {spec.key}"), locked(locks_dir(root) / "create.lock", wait=True):
            files = run_files(root, spec.key)
            if not (files / CREATED).exists():
                raise RunNotFound(f"run {spec.key} does not exist in {store.root}")
            _check_stored(run_dir, spec, dict(spec.manifest, schema=SCHEMA_VERSION))
            return Progress(files).done_units()

    def pending_units(self, shard: int = 0, n_shards: int = 1) -> list[int]:
        done = self.progress.done_units()
        return [u for u in self.spec.layout.shard_units(shard, n_shards) if u not in done]

    @contextlib.contextmanager
    def claim(self, shard: int, n_shards: int) -> Iterator[None]:
        """Hold the lock of one shard of this run; a second process on it gets ``RunBusy``."""
        lock = self.files / f".shard-{shard}-of-{n_shards}.lock"
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(locked(writers_lock(self.store, self.spec.key), wait=False, shared=True))
                held.enter_context(locked(lock, wait=False))
            except BlockingIOError as exc:
                raise RunBusy(
                    f"run {self.spec.key} shard {shard}/{n_shards} is being written by another process; "
                    "wait for it, or run a different --shard"
                ) from exc
            if _creation_id(self.files) != self._created:
                raise RunBusy(f"run {self.spec.key} was recreated by another process since it was opened")
            yield

    def write_unit(self, unit: int, data: dict[str, np.ndarray], predictions: dict[str, np.ndarray]) -> None:
        """Write all arrays of ``unit`` and the predictions it owns, then mark it done."""
        with _storage_errors(f"writing {self.spec.key} unit {unit}"):
            self._write_unit(unit, data, predictions)

    def _write_unit(self, unit: int, data: dict[str, np.ndarray], predictions: dict[str, np.ndarray]) -> None:
        r0, r1 = self.spec.layout.unit_rows(unit)
        checksums = {}
        for path, arr in self._arrays.items():
            block = data[path]  # (r1 - r0, neurons)
            if block.shape != (r1 - r0, arr.shape[1]):
                raise ValueError(f"{path}: unit {unit} block {block.shape} != {(r1 - r0, arr.shape[1])}")
            arr[r0:r1] = block
            checksums[path] = zlib.crc32(np.ascontiguousarray(block, dtype=arr.dtype).tobytes())
        row_chunk = r0 // self.spec.layout.chunk_rows
        for path in self._arrays:
            fsync_tree(self.dir / path / "c" / str(row_chunk))
        _crash_point("chunks-written", unit)
        part = _predictions_bytes(predictions)
        (self.files / "_predictions").mkdir(exist_ok=True)
        atomic_write(self.files / "_predictions" / f"u{unit:07d}.parquet", part)
        _crash_point("predictions-written", unit)
        record = {"rows": [r0, r1], "crc32": checksums, "n_predictions": len(predictions["example_id"])}
        self.progress.mark_done(unit, record)


@contextlib.contextmanager
def _storage_errors(doing: str) -> Iterator[None]:
    """Turn a full or read-only disk into a ``StoreError``; committed units are never touched by it."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            msg = f"disk full while {doing}: free space, then rerun the same command to resume"
            raise StoreError(msg) from exc
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            msg = f"store is not writable while {doing} ({exc.strerror}): fix permissions or choose --store"
            raise StoreError(msg) from exc
        raise


def _crash_point(name: str, unit: int) -> None:
    """Kill this process at a named point of a unit's commit, when a crash test asks for it.

    ``QCACHE_CRASH_AT=chunks-written:3`` sends SIGKILL to the process after unit 3's chunks are on disk and
    before its marker: the resume tests use it to hit the windows a random kill rarely lands in.
    """
    want = os.environ.get("QCACHE_CRASH_AT")
    if want and want == f"{name}:{unit}":
        os.kill(os.getpid(), signal.SIGKILL)


def _check_stored(run_dir: Path, spec: RunSpec, manifest: dict[str, Any]) -> None:
    """Raise ``RunMismatch`` unless the run stored at ``run_dir`` has ``manifest``'s identity and ``spec``'s
    tokens."""
    stored = json.loads((run_dir / "zarr.json").read_text())["attributes"]["manifest"]
    check_same_run(stored, manifest, str(spec.key))
    _check_same_tokens(run_dir, spec, stored)


def _check_same_tokens(run_dir: Path, spec: RunSpec, stored: dict[str, Any]) -> None:
    """Raise ``RunMismatch`` unless ``spec`` has the stored run's example lengths and token ids.

    Equal arguments do not make equal tokens: a tokenizer of another transformers version or model
    revision (another node, a launcher's parent against its child) would write rows at the wrong places.
    Compared here, not fingerprinted, so stores made before this check still resume.
    """
    lengths = zarr.open_array(str(run_dir / "examples/length"), mode="r")[:]  # (examples,)
    new = np.asarray(spec.layout.lengths)
    if len(lengths) != len(new):
        what = f"{len(lengths)} examples stored vs {len(new)} here"
    elif (diff := np.flatnonzero(lengths != new)).size:
        e = int(diff[0])
        what = f"{diff.size} example length(s) differ, first example {e}: {lengths[e]} stored vs {new[e]}"
    else:
        ids = zarr.open_array(str(run_dir / "tokens/token_id"), mode="r")[:]  # (tokens,)
        diff = np.flatnonzero(ids != np.asarray(spec.token_ids))
        if not diff.size:
            return
        r = int(diff[0])
        e = int(np.searchsorted(spec.layout.starts, r, side="right")) - 1
        at = f"example {e} position {r - int(spec.layout.starts[e])}"
        what = f"{diff.size} token id(s) differ, first at {at}: {ids[r]} stored vs {spec.token_ids[r]}"
    raise RunMismatch(
        f"run {spec.key}: token layout differs from the stored run: {what}"
        f"{_origin_diff(stored, spec.manifest)}; same transformers/tokenizer and model revision on every "
        "node? Extract with those that created the run, or pass --overwrite to start over"
    )


def _origin_diff(stored: dict[str, Any], here: dict[str, Any]) -> str:
    """`` (stored vs here: transformers 4.56.0 vs 4.57.1)``: the versions and revision that differ."""
    a, b = stored.get("versions") or {}, here.get("versions") or {}
    diffs = [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
    if stored.get("model_revision") != here.get("model_revision"):
        diffs.append(f"model revision {stored.get('model_revision')} vs {here.get('model_revision')}")
    return f" (stored vs here: {', '.join(diffs)})" if diffs else ""


def _predictions_bytes(columns: dict[str, np.ndarray]) -> bytes:
    fields = {}
    for name, values in columns.items():
        values = np.asarray(values)
        if values.ndim == 2:  # (examples, labels) -> fixed-size list column
            flat = pa.array(values.reshape(-1))
            fields[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        else:
            fields[name] = pa.array(values)
    sink = io.BytesIO()
    pq.write_table(pa.table(fields), sink)
    return sink.getvalue()


def _creation_id(files: Path) -> str | None:
    """The random id written when the run was created ("gone" if deleted; None before ids existed)."""
    try:
        return creation_id(files)
    except FileNotFoundError:
        return "gone"


def writers_lock(store: Store, key: RunKey) -> Path:
    """Held shared by every writer of a run, exclusively by ``--overwrite``; outside the run's directories."""
    return locks_dir(store.local_root) / f"{key.dataset}--{key.model}--{key.quant}.lock"


@contextlib.contextmanager
def locked(path: Path, *, wait: bool, shared: bool = False) -> Iterator[None]:
    """An advisory ``flock`` on ``path`` (released when the process dies, so a kill -9 frees it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)
