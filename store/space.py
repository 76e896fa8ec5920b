"""Disk space of a run: the bytes of every array it creates, the bytes still to write, the free-space check.

Sizes follow ``writer._create`` and ``RunWriter.write_unit``: index arrays are written once at creation,
each ``(tokens, neurons)`` array one unit (``chunk_rows`` rows) at a time. ``pending_bytes`` is an upper
bound on what the pending units put on disk *if activations did not compress at all* (they compress
1.4-1.6x, docs/design/codec.md): real bytes, plus Blosc's 16-byte header and the NaN padding of edge
chunks (measured at most ~3% of the padding, it compresses away), each file rounded up to a 4 KiB block.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bookkeeping import CREATED, run_files
from .codecs import neuron_chunk
from .errors import StoreError
from .layout import TokenLayout
from .location import tree_size
from .manifest import SCHEMA_VERSION, batching_identity, fingerprint
from .progress import Progress
from .store import Store
from .writer import ArraySpec, RunSpec

BLOCK = 4096  # file-system allocation unit every file is rounded up to
BLOSC_HEADER = 16  # bytes Blosc adds to a chunk it stores uncompressed
UNIT_FILES = 2 * BLOCK  # a unit's predictions part (~3 kB + ~50 B per example) and its progress marker
CREATION_FILES = 64 * BLOCK  # zarr.json of every group and array, ``_created``: written at creation

# Arrays every run gets at creation (writer._create): path -> (axis, dtype).
INDEX_ARRAYS: dict[str, tuple[str, str]] = {
    "tokens/example_id": ("tokens", "int32"),
    "tokens/position": ("tokens", "int32"),
    "tokens/token_id": ("tokens", "int32"),
    "examples/start": ("examples", "int64"),
    "examples/length": ("examples", "int32"),
    "examples/gold": ("examples", "int16"),
    "examples/n_truncated": ("examples", "int32"),
    "examples/source_row": ("examples", "int64"),
}
# Variable-length UTF-8 arrays (writer.py): uncompressed bytes allowed per token of the run, an allowance
# rather than a bound: a token string is its text (1-10 bytes, escapes included) plus a 4-byte length; a
# prompt is ~4 bytes of text per token. zstd then shrinks both 3-5x.
TEXT_ARRAYS: dict[str, tuple[str, int]] = {
    "tokens/token": ("tokens", 16),
    "examples/prompt": ("examples", 8),
}


@dataclass(frozen=True)
class ArraySize:
    """Shape, dtype and uncompressed bytes of one array of a run."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    item_bytes: int | None = None  # bytes per item where ``dtype`` has no fixed size (``string``)

    @property
    def nbytes(self) -> int:
        item = self.item_bytes if self.item_bytes is not None else np.dtype(self.dtype).itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * item


def array_sizes(layout: TokenLayout, arrays: Sequence[ArraySpec]) -> list[ArraySize]:
    """Every array a run with ``layout`` and ``arrays`` creates, index and text arrays first."""
    n = {"tokens": layout.n_tokens, "examples": layout.n_examples}
    out = [ArraySize(path, (n[axis],), dtype) for path, (axis, dtype) in INDEX_ARRAYS.items()]
    per_example = -(-layout.n_tokens // max(1, layout.n_examples))
    for path, (axis, per_token) in TEXT_ARRAYS.items():
        item = per_token * (1 if axis == "tokens" else per_example)
        out.append(ArraySize(path, (n[axis],), "string", item_bytes=item))
    return out + [ArraySize(a.path, (layout.n_tokens, a.n_neurons), a.dtype) for a in arrays]


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def unit_bytes(layout: TokenLayout, arrays: Sequence[ArraySpec], unit: int) -> int:
    """Upper bound of the bytes one unit's commit writes: its chunk files, predictions part and marker."""
    r0, r1 = layout.unit_rows(unit)
    total = UNIT_FILES
    for a in arrays:
        width = neuron_chunk(a.n_neurons)
        item = np.dtype(a.dtype).itemsize
        for c0 in range(0, a.n_neurons, width):
            real = (r1 - r0) * min(width, a.n_neurons - c0) * item
            padding = layout.chunk_rows * width * item - real
            total += _round_up(real + BLOSC_HEADER + padding // 32)
    return total


def pending_bytes(
    layout: TokenLayout, arrays: Sequence[ArraySpec], units: Iterable[int], *, new_run: bool
) -> int:
    """Upper bound of the bytes still to write: ``units``, plus the index arrays when the run is new."""
    total = sum(unit_bytes(layout, arrays, u) for u in units)
    if new_run:
        index = [s for s in array_sizes(layout, ()) if s.path in INDEX_ARRAYS or s.path in TEXT_ARRAYS]
        total += CREATION_FILES + sum(_round_up(s.nbytes + BLOSC_HEADER) for s in index)
    return total


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system holding ``path``, or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def fmt_bytes(n: float) -> str:
    """Decimal units, as disks are sold: ``fmt_bytes(13.5e9) == '13.5 GB'``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def resumable_units(store: Store, spec: RunSpec) -> set[int] | None:
    """Done units of ``spec``'s run if it exists with the same fingerprint; ``None`` if it is new.

    A run that exists with other arguments also gives ``None``: ``RunWriter.open`` refuses it anyway.
    """
    run_dir = store.local_root / spec.key.path
    files = run_files(store.local_root, spec.key)
    if not (files / CREATED).exists():
        return None
    try:
        stored = json.loads((run_dir / "zarr.json").read_text())["attributes"]["manifest"]
    except (OSError, ValueError, KeyError):
        return None
    if fingerprint(stored) != fingerprint(dict(spec.manifest, schema=SCHEMA_VERSION)):
        return None
    if batching_identity(stored) not in (None, batching_identity(spec.manifest)):
        return None
    return Progress(files).done_units()


def ensure_space(
    store: Store, spec: RunSpec, *, shard: tuple[int, int] = (0, 1), overwrite: bool = False
) -> int:
    """Raise ``StoreError`` when the pending units of ``shard`` cannot fit on the store's disk.

    Returns the bytes needed. Only pending units count, so resuming a nearly finished run is not refused;
    ``overwrite`` counts the whole run and credits the bytes of the run it deletes first.
    """
    layout = spec.layout
    units = layout.shard_units(*shard)
    done = None if overwrite else resumable_units(store, spec)
    pending = [u for u in units if done is None or u not in done]
    need = pending_bytes(layout, spec.arrays, pending, new_run=done is None)
    root = store.local_root  # runs are written to local directories only
    free = free_bytes(root)
    if overwrite:
        free += tree_size(root / spec.key.path)  # what deleting the run frees
    if need > free:
        rows = sum(layout.unit_rows(u)[1] - layout.unit_rows(u)[0] for u in pending)
        raise StoreError(
            f"not enough disk for {spec.key}: {len(pending)} unit(s), {rows} token rows need up to "
            f"{fmt_bytes(need)} (uncompressed; Blosc usually saves 25-40%) but {fmt_bytes(free)} is free "
            f"at {root}: free space, choose another --store, reduce --limit or --layers, "
            "or pass --no-disk-check to start anyway (a full disk stops the run cleanly; it resumes)"
        )
    return need
