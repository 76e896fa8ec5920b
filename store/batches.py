"""Shuffled ``(batch_tokens, neurons)`` batches of one cached array, for training probes and SAEs on it.

Mixing follows SAELens' ``ActivationsStore`` (``sae_lens/training/mixing_buffer.py``): activations are
pooled far beyond a batch, the pool is permuted, and batches are cut from it. Here a pool is whole stored
chunks (units of ``chunk_rows`` rows, each read and decompressed in one piece) taken in a random order, so
a batch mixes tokens of many chunks from all over the run:

1. an epoch lists the run's committed units and permutes them (``seed``, ``epoch``);
2. part ``i`` of ``n`` (a DataLoader worker, a rank) takes every ``n``-th unit of that list, so parts never
   share a row;
3. ``buffer_tokens`` worth of those units form a pool; its rows are permuted and dealt into batches: first
   the batch the previous pool left unfinished, then new ones. Rows that do not fill a last batch of the
   pool leave it open for the next pool (spread over random positions of it, not stacked at its front);
4. after the last pool the open batch's rows form one short batch (dropped with ``drop_last``).

Every committed row is yielded exactly once per epoch. Where each row goes is decided before its pool is
read, so each row is copied once, from its decompressed chunk straight into its batch: the work of a plain
sequential read. The next pool is read on background threads while the current one is consumed (file
reads, Blosc and numpy copies release the GIL); the result depends only on ``seed``, ``epoch`` and the part,
never on thread timing. Each batch is a fresh array the caller owns. Memory: about two pools of batches,
``2 * (buffer_tokens + batch_tokens) * neurons * itemsize`` bytes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from .chunks import DirectChunks, direct_chunks
from .errors import IncompleteRun, InvalidOption
from .location import zarr_location

if TYPE_CHECKING:
    from .reader import Run

BUFFER_BATCHES = 4  # default pool: 4 batches' worth of rows (about 16 chunks at the defaults)
READ_THREADS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class BatchPlan:
    """A checked request for batches: the array, the committed units and the batching options.

    Made by ``plan_batches``; ``batches(epoch, part, n_parts)`` iterates it. The unit list is a snapshot
    taken when the plan is made, so every part of an epoch splits the same list (units committed later by
    a running extraction join a new plan, never half an epoch).
    """

    run: Run
    path: str  # the array inside the run, e.g. "layers/L015/activations"
    units: tuple[int, ...]  # committed units, sorted
    batch_tokens: int
    buffer_tokens: int
    shuffle: bool
    seed: int
    drop_last: bool

    @property
    def n_rows(self) -> int:
        """Rows one epoch yields over all parts (before ``drop_last``)."""
        return sum(r1 - r0 for r0, r1 in map(self.run.layout.unit_rows, self.units))

    def unit_order(self, epoch: int, part: int = 0, n_parts: int = 1) -> list[int]:
        """The units part ``part`` of ``n_parts`` reads in ``epoch``, in reading order."""
        _check_count("epoch", epoch, 0)
        _check_part(part, n_parts)
        order = list(self.units)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        return order[part::n_parts]

    def batches(self, epoch: int = 0, part: int = 0, n_parts: int = 1) -> Iterator[np.ndarray]:
        """Yield part ``part`` of ``n_parts`` of ``epoch``: ``(batch_tokens, neurons)`` arrays of the stored
        dtype, the last one shorter unless ``drop_last``."""
        order = self.unit_order(epoch, part, n_parts)
        rng = np.random.default_rng([self.seed, epoch, part, n_parts]) if self.shuffle else None
        return _serve(self, order, rng)


def plan_batches(
    run: Run,
    layer: int,
    tap: str = "act",
    *,
    batch_tokens: int = 4096,
    shuffle: bool = True,
    seed: int = 0,
    buffer_tokens: int | None = None,
    drop_last: bool = False,
    allow_partial: bool = False,
) -> BatchPlan:
    """Check a batch request against ``run`` and snapshot its committed units.

    Raises ``InvalidName`` (layer or tap not cached), ``InvalidOption`` (a count that is not a positive
    int, a buffer smaller than a batch, ``drop_last`` with a batch larger than the committed rows) and
    ``IncompleteRun`` (an unfinished run without ``allow_partial``).
    """
    path = run.array_path(layer, tap)  # InvalidOption for a layer not an int, InvalidName for one not held
    _check_count("batch_tokens", batch_tokens, 1)
    _check_count("seed", seed, 0)
    buffer = BUFFER_BATCHES * int(batch_tokens) if buffer_tokens is None else buffer_tokens
    _check_count("buffer_tokens", buffer, 1)
    if buffer < batch_tokens:
        raise InvalidOption(
            f"buffer_tokens={buffer!r} is smaller than batch_tokens={batch_tokens!r}: the shuffle pool must "
            "hold at least one batch; raise buffer_tokens or leave it None (4 batches)"
        )
    if not run.complete and not allow_partial:
        raise IncompleteRun(
            f"run {run.key} is {100 * run.fraction_done:.1f}% extracted: finish it with the same "
            "`qcache extract` command, or pass allow_partial=True to stream only its committed units"
        )
    plan = BatchPlan(
        run=run,
        path=path,
        units=tuple(sorted(run.done_units())),
        batch_tokens=int(batch_tokens),
        buffer_tokens=int(buffer),
        shuffle=bool(shuffle),
        seed=int(seed),
        drop_last=bool(drop_last),
    )
    if drop_last and plan.n_rows < batch_tokens:
        raise InvalidOption(
            f"drop_last=True with batch_tokens={batch_tokens!r} would yield no batch: {run.key} holds "
            f"{plan.n_rows} committed token rows; lower batch_tokens or pass drop_last=False"
        )
    return plan


def _check_count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise InvalidOption(f"{name} must be an int >= {least}, got {value!r}")


def _check_part(part: int, n_parts: int) -> None:
    _check_count("n_parts", n_parts, 1)
    _check_count("part", part, 0)
    if part >= n_parts:
        raise InvalidOption(f"part must be in [0, n_parts={n_parts!r}), got {part!r}")


# -- placing rows ----------------------------------------------------------------------------------------

# (batch, positions in it, rows of the unit): one unit's rows that land in one batch
Target = tuple[np.ndarray, "np.ndarray | slice", "np.ndarray | slice"]


@dataclass
class _Open:
    """A batch still being filled; its ``k``-th row goes to position ``order[k]`` (random when shuffling,
    so rows carried over from the previous pool are spread through it, not stacked at its front)."""

    data: np.ndarray  # (batch_tokens, neurons)
    order: np.ndarray  # (batch_tokens,) int64
    filled: int = 0


class _Placer:
    """Decides, before a pool is read, where each of its rows goes: every row is copied once, from the
    decompressed chunk straight into the batch it belongs to (the same single copy a plain read makes)."""

    def __init__(self, batch: int, cols: int, dtype: np.dtype, rng: np.random.Generator | None) -> None:
        self.b, self.cols, self.dtype, self.rng = batch, cols, dtype, rng
        self.open: _Open | None = None

    def _new(self) -> _Open:
        order = self.rng.permutation(self.b) if self.rng is not None else np.arange(self.b)
        return _Open(np.empty((self.b, self.cols), self.dtype), order)

    def place(self, counts: list[int]) -> tuple[list[np.ndarray], list[list[Target]]]:
        """For a pool of units with ``counts`` rows each: the batches it completes (in yield order) and,
        per unit, where its rows go."""
        total, b = sum(counts), self.b
        perm = self.rng.permutation(total) if self.rng is not None else np.arange(total)
        arrays: list[np.ndarray] = []
        ready: list[np.ndarray] = []
        slot_array = np.empty(total, np.int64)  # the pool's s-th row (in perm order) goes to this array...
        slot_pos = np.empty(total, np.int64)  # ...at this position
        s = 0
        while s < total:
            if self.open is None:
                self.open = self._new()
            o = self.open
            take = min(total - s, b - o.filled)
            slot_array[s : s + take] = len(arrays)
            slot_pos[s : s + take] = o.order[o.filled : o.filled + take]
            arrays.append(o.data)
            o.filled += take
            s += take
            if o.filled == b:
                ready.append(o.data)
                self.open = None
        dest_array, dest_pos = np.empty_like(slot_array), np.empty_like(slot_pos)
        dest_array[perm], dest_pos[perm] = slot_array, slot_pos  # row q of the pool -> (array, position)
        targets, r = [], 0
        for n in counts:
            targets.append(_targets(arrays, dest_array[r : r + n], dest_pos[r : r + n]))
            r += n
        return ready, targets

    def rest(self) -> np.ndarray | None:
        """The short last batch: the rows of a batch left open after the last pool, in a fresh array."""
        if self.open is None or self.open.filled == 0:
            return None
        o = self.open
        return o.data[o.order[: o.filled]] if self.rng is not None else o.data[: o.filled].copy()


def _targets(arrays: list[np.ndarray], array: np.ndarray, pos: np.ndarray) -> list[Target]:
    """Group one unit's rows by destination batch; rows in order, contiguous runs as slices."""
    by = np.argsort(array, kind="stable")
    cuts = np.flatnonzero(np.diff(array[by])) + 1
    out: list[Target] = []
    for rows in np.split(by, cuts):
        p = pos[rows]
        if rows[-1] - rows[0] == len(rows) - 1 and p[-1] - p[0] == len(p) - 1 and np.all(np.diff(p) == 1):
            out.append((arrays[array[rows[0]]], slice(p[0], p[-1] + 1), slice(rows[0], rows[-1] + 1)))
        else:
            out.append((arrays[array[rows[0]]], p, rows))
    return out


# -- reading ----------------------------------------------------------------------------------------------


class _UnitReader:
    """Reads one unit's rows, every column chunk, and copies them to their batches: straight from the chunk
    files where the layout allows (``chunks.direct_chunks``), else through zarr (remote stores)."""

    def __init__(self, run: Run, path: str) -> None:
        where = run.dir / path
        self.array = zarr.open_array(store=zarr_location(where), mode="r", zarr_format=3)
        self.rows, self.width = self.array.chunks
        self.n_rows, self.n_cols = self.array.shape
        if self.rows != run.layout.chunk_rows:  # qcache writes one row chunk per unit
            raise InvalidOption(
                f"{where} has row chunks of {self.rows}, not the run's {run.layout.chunk_rows}"
            )
        self.direct: DirectChunks | None = (
            direct_chunks(self.array, where) if isinstance(where, Path) else None
        )
        self.n_blocks = -(-self.n_cols // self.width)
        self._scratch = threading.local()  # one reusable chunk buffer per reading thread

    def count(self, unit: int) -> int:
        """Real rows of ``unit`` (fewer in the last, edge unit)."""
        return min(self.rows, self.n_rows - unit * self.rows)

    def read(self, unit: int, targets: list[Target]) -> None:
        r0 = unit * self.rows
        if self.direct is None:
            # through zarr, which fetches the unit's column chunks concurrently
            block = np.asarray(self.array[r0 : r0 + self.count(unit)])
            for out, pos, rows in targets:
                out[pos] = block[rows]
            return
        tmp = getattr(self._scratch, "chunk", None)
        if tmp is None:
            tmp = self._scratch.chunk = np.empty((self.rows, self.width), dtype=self.array.dtype)
        for j in range(self.n_blocks):
            self.direct.read_into((unit, j), tmp)
            c0, c1 = j * self.width, min((j + 1) * self.width, self.n_cols)
            for out, pos, rows in targets:
                out[pos, c0:c1] = tmp[rows, : c1 - c0]


# -- serving ----------------------------------------------------------------------------------------------


def _serve(plan: BatchPlan, order: list[int], rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    reader = _UnitReader(plan.run, plan.path)
    per_pool = max(1, -(-plan.buffer_tokens // reader.rows))
    groups = [order[i : i + per_pool] for i in range(0, len(order), per_pool)]
    placer = _Placer(plan.batch_tokens, reader.n_cols, np.dtype(reader.array.dtype), rng)
    threads = 8 if reader.direct is None else READ_THREADS  # remote reads wait on the network, not a core
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qcache-batches")

    def submit(group: list[int]) -> tuple[list[np.ndarray], list[Future[None]]]:
        ready, targets = placer.place([reader.count(u) for u in group])
        return ready, [executor.submit(reader.read, u, t) for u, t in zip(group, targets, strict=True)]

    try:
        pending = submit(groups[0]) if groups else ([], [])
        for g in range(len(groups)):
            ready, futures = pending
            for f in futures:
                f.result()
            if g + 1 < len(groups):  # read the next pool while this one's batches are consumed
                pending = submit(groups[g + 1])
            yield from ready
        last = placer.rest()
        if last is not None and not plan.drop_last:
            yield last
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
