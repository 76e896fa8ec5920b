"""The disk side of a plan: every array's bytes, what is still to write, and free space at the store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qcache.extract.run.runner import ExtractConfig
from qcache.store import RunKey, TokenLayout
from qcache.store.keys import TAP_ARRAYS
from qcache.store.location import tree_size
from qcache.store.manifest import batching_identity
from qcache.store.space import ArraySize, array_sizes, free_bytes, pending_bytes
from qcache.store.store import open_store
from qcache.store.writer import ArraySpec

# Blosc LZ4 + bit-shuffle on SmolLM2 activations (docs/design/codec.md); attributions were not measured.
TYPICAL_RATIO = {"float16": 1.36, "float32": 1.63}
UNIT_FILE_BYTES = 3_500  # a unit's parquet part before its rows (schema, footer) plus its marker, measured


@dataclass(frozen=True)
class Disk:
    arrays: list[ArraySize]
    predictions: int  # parquet parts and progress markers (approximate)
    total: int  # every array uncompressed, plus ``predictions``
    typical: int  # after Blosc at the measured ratios
    units_total: int
    units_pending: int
    pending: int  # upper bound still to write: what extraction's disk check compares with ``free``
    free: int | None
    store: str
    existing: str  # what the store holds under this run's key
    conflict: bool  # a run with other arguments is there: extract refuses it unless --overwrite


@dataclass(frozen=True)
class Existing:
    """A run already under this key: the units it has done and its stored token layout, if it resumes."""

    done: set[int]
    layout: TokenLayout | None
    text: str
    n_truncated: int = 0
    conflict: bool = False


def plan_disk(
    cfg: ExtractConfig,
    key: RunKey,
    layout: TokenLayout,
    arrays: list[ArraySpec],
    existing: Existing,
    *,
    n_labels: int,
    n_layers: int,
) -> Disk:
    """Bytes of every array (exact), the small files (approximate), and what is still to write."""
    sizes = array_sizes(layout, arrays)
    # per example: ids, gold, 2 x K label probabilities, prediction, confidence, flags, top token (~8 chars)
    row = 42 + 8 * n_labels + ((12 + 16 * n_layers) if cfg.attributions is not None else 0)
    predictions = layout.n_units * UNIT_FILE_BYTES + layout.n_examples * row
    activations = tuple(f"/{name}" for name in TAP_ARRAYS.values())
    typical = predictions + sum(
        a.nbytes / TYPICAL_RATIO[a.dtype] if a.path.endswith(activations) else a.nbytes for a in sizes
    )
    pending = [u for u in layout.shard_units(*cfg.shard) if u not in existing.done]
    free = free_bytes(cfg.store)  # a local directory: extract_config refuses URLs
    if cfg.overwrite:
        free += tree_size(Path(cfg.store) / key.path)
    return Disk(
        arrays=sizes,
        predictions=predictions,
        total=sum(a.nbytes for a in sizes) + predictions,
        typical=int(typical),
        units_total=layout.n_units,
        units_pending=len(pending),
        pending=pending_bytes(layout, arrays, pending, new_run=existing.layout is None),
        free=free,
        store=str(cfg.store),
        existing=existing.text,
        conflict=existing.conflict,
    )


def existing_run(cfg: ExtractConfig, key: RunKey, layers: list[int], n_tokens: int | None) -> Existing:
    """What the store holds under ``key``; a run resumes when its arguments match (``n_tokens`` if known)."""
    if not (Path(cfg.store) / "zarr.json").exists():
        return Existing(set(), None, "no store yet: it will be created")
    store = open_store(cfg.store)
    if not store.has_run(key):
        return Existing(set(), None, "no such run yet")
    if cfg.overwrite:
        return Existing(set(), None, "exists; --overwrite deletes it first")
    run = store.run(key)
    stored = run.manifest
    data = stored.get("dataset", {})
    same = (
        stored.get("layers") == layers
        and stored.get("taps") == list(cfg.taps)
        and stored.get("chunk_rows") == cfg.chunk_rows
        and stored.get("max_length") == cfg.max_length
        and stored.get("label_scoring", "first-token") == cfg.label_scoring
        and bool(stored.get("attributions")) == (cfg.attributions is not None)
        and (data.get("limit"), data.get("seed"), data.get("split"))
        == (cfg.dataset.limit, cfg.dataset.seed, cfg.dataset.split)
        and n_tokens in (None, stored.get("n_tokens"))
        and batching_identity(stored) in (None, {"mode": cfg.batching, "batch_size": cfg.batches.size})
    )
    if not same:
        return Existing(set(), None, "exists with other arguments", conflict=True)
    done = run.done_units()
    text = f"exists, {len(done)} of {run.layout.n_units} units done: extract resumes it"
    return Existing(done, run.layout, text, int(stored.get("n_truncated_examples", 0)))
