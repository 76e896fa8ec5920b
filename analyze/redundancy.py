"""Neuron redundancy (the paper's sections 2.5 and 4.5): exact Pearson r of every neuron pair, blockwise.

For a layer X (tokens N, neurons D): one pass computes the column means and centered norms in float64
(Chan's pairwise combination of per-chunk moments, so near-constant neurons keep their precision); then
for each pair of column blocks (I, J), I <= J, the Gram block (X_I - mu_I)^T (X_J - mu_J) is summed over
row tiles: float32 products of centered data per tile (``a.T @ a``, half the work, on diagonal blocks),
accumulated across tiles in float64. The last task of each block pair turns it into |r| and histograms it
where it was computed: only counts (and optionally the top pairs) travel, and never more than one (b, b)
block of the D x D matrix per pair in flight. See docs/design/redundancy.md.

Bins: |r| in [0.0, 0.1), ..., [0.8, 0.9), [0.9, 1.0] (1.0 falls in the last bin). Constant neurons (zero
variance, e.g. dead ReLU neurons) have no correlation: they are counted apart and their pairs are left out.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from .scheduler import pairwise_reduce

N_BINS = 10
EDGES = np.linspace(0.0, 1.0, N_BINS + 1)
TILE_ROWS = 4096  # rows per Gram product: BLAS runs ~10-20% faster than at the store's 1024-row chunks


@dataclass
class PairCounts:
    """Histogram of |r| over unordered neuron pairs, plus what was left out."""

    bins: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS, dtype=np.int64))
    above: int = 0  # pairs with |r| >= threshold
    n_pairs: int = 0  # pairs counted in bins
    n_constant: int = 0  # neurons with zero variance, excluded
    top: list[tuple[float, int, int]] = field(default_factory=list)  # (|r|, i, j), best first


def column_moments(x: da.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, norm)`` of each column in float64, norm = sqrt(sum (x - mean)^2).

    Dask's ``var`` centers each chunk on its own mean and combines chunks with Chan's formula, so the norm
    of a neuron with a large mean and a tiny spread does not cancel away (``sum x^2 - n mean^2`` would).
    """
    x64 = x.astype(np.float64)
    mean, var = dask.compute(x64.mean(axis=0), x64.var(axis=0))
    return mean, np.sqrt(var * x.shape[0])


def _blocks(d: int, b: int) -> tuple[int, ...]:
    return tuple(min(b, d - i) for i in range(0, d, b))


def _centered(block: np.ndarray, mu32: np.ndarray) -> np.ndarray:
    # (rows, b) float32; x - float32(mu) is exact when x and mu are within a factor 2 (Sterbenz), so a
    # large common offset costs nothing; the rounding of mu itself is corrected in _finish
    out = block.astype(np.float32)
    out -= mu32
    return out


def _tile_gram(a: np.ndarray, b: np.ndarray | None, mu_a: np.ndarray, mu_b: np.ndarray | None) -> np.ndarray:
    """``(b_I, b_J)`` float64 product of one row tile; ``b`` None: diagonal block, symmetric ``a.T @ a``."""
    ac = _centered(a, mu_a)
    if b is None:
        return (ac.T @ ac).astype(np.float64)  # numpy sees the transpose of one buffer: SYRK, half the flops
    return (ac.T @ _centered(b, mu_b)).astype(np.float64)


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a += b
    return a


def _r_block(
    gram: np.ndarray,
    n_rows: int,
    shift_i: np.ndarray,
    shift_j: np.ndarray,
    norm_i: np.ndarray,
    norm_j: np.ndarray,
    diagonal: bool = False,
) -> np.ndarray:
    """Signed r of one Gram block, in place (inf/nan where a neuron is constant)."""
    # data were centered on float32(mu) = mu + shift; since sum(x - mu) = 0 exactly, the product of the
    # shifted data is the centered one plus n * shift_i shift_j
    gram -= n_rows * np.outer(shift_i, shift_j)
    with np.errstate(divide="ignore", invalid="ignore"):
        gram /= norm_i[:, None]
        gram /= norm_j[None, :]
    return gram


def _finish_counts(
    gram: np.ndarray,
    n_rows: int,
    shift_i: np.ndarray,
    shift_j: np.ndarray,
    norm_i: np.ndarray,
    norm_j: np.ndarray,
    diagonal: bool,
    threshold: float,
    top_k: int,
) -> tuple[np.ndarray, int, int, list[tuple[float, int, int]]]:
    """Counts of one Gram block: ``(bins, above, n_pairs, top)`` with top indices local to the block."""
    r = _r_block(gram, n_rows, shift_i, shift_j, norm_i, norm_j)
    r = np.abs(r, out=r)  # (b_I, b_J) |r|, in place: one block of memory
    valid = (norm_i > 0)[:, None] & (norm_j > 0)[None, :]
    if diagonal:
        valid &= np.triu(np.ones(valid.shape, dtype=bool), k=1)  # each unordered pair once, no self-pairs
    vals = np.minimum(r[valid], 1.0)  # |r| can exceed 1 by rounding
    bins = np.histogram(vals, bins=EDGES)[0]
    top = _block_top(r, valid, top_k) if top_k else []
    return bins, int(np.count_nonzero(vals >= threshold)), int(vals.size), top


def _block_top(r: np.ndarray, valid: np.ndarray, k: int) -> list[tuple[float, int, int]]:
    flat = np.where(valid, r, -1.0).ravel()
    take = min(k, flat.size)
    idx = np.argpartition(flat, -take)[-take:]
    return [
        (float(min(flat[i], 1.0)), int(i) // r.shape[1], int(i) % r.shape[1]) for i in idx if flat[i] >= 0
    ]


Moments = tuple[np.ndarray, np.ndarray]


def _block_tasks(
    x: da.Array,
    y: da.Array | None,
    moments: tuple[Moments, Moments],
    block: int,
    tile_rows: int,
    finish: Callable[..., Any],
    *args: Any,
) -> Iterator[tuple[slice, slice, Delayed]]:
    """``(I, J, task)`` per column-block pair, task = ``finish(gram, n, shifts, norms, diagonal, *args)``."""
    same = y is None
    y = x if y is None else y
    (mx, nx), (my, ny) = moments
    n = x.shape[0]
    rows = max(1, min(tile_rows, n))
    bx, by = _blocks(x.shape[1], block), _blocks(y.shape[1], block)
    tx = x.rechunk((rows, bx)).to_delayed()  # (tiles, column blocks) of Delayed
    ty = tx if same else y.rechunk((rows, by)).to_delayed()
    ox, oy = np.cumsum((0, *bx)), np.cumsum((0, *by))
    mx32, my32 = mx.astype(np.float32), my.astype(np.float32)
    for i in range(len(bx)):
        for j in range(i if same else 0, len(by)):
            si, sj = slice(int(ox[i]), int(ox[i + 1])), slice(int(oy[j]), int(oy[j + 1]))
            diagonal = same and i == j
            parts = [
                dask.delayed(_tile_gram)(tx[t, i], None if diagonal else ty[t, j], mx32[si], my32[sj])
                for t in range(tx.shape[0])
            ]
            shifts = (mx32[si] - mx[si], my32[sj] - my[sj])
            task = dask.delayed(finish)(
                pairwise_reduce(parts, _add), n, *shifts, nx[si], ny[sj], diagonal, *args
            )
            yield si, sj, task


def correlation_blocks(
    x: da.Array, y: da.Array | None = None, *, block: int = 2048, tile_rows: int = TILE_ROWS
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """Yield ``(I, J, r_IJ)``, the signed Pearson r blocks (I <= J within ``x``), one at a time.

    For checks and benchmarks; entries of constant neurons are inf or nan.
    """
    moments = _moments(x, y)
    for si, sj, task in _block_tasks(x, y, moments, block, tile_rows, _r_block):
        yield si, sj, dask.compute(task)[0]


def correlation_counts(
    x: da.Array,
    y: da.Array | None = None,
    *,
    threshold: float = 0.8,
    block: int = 2048,
    top_k: int = 0,
    tile_rows: int = TILE_ROWS,
) -> PairCounts:
    """|r| histogram of all unordered pairs within ``x`` (or all pairs between ``x`` and ``y``).

    ``x``, ``y``: (tokens, neurons) dask arrays; ``block`` columns per Gram block, ``tile_rows`` rows per
    product. Each block pair is one ``dask.compute`` of delayed tasks whose result is a few counts.
    """
    moments = _moments(x, y)
    (_, nx), (_, ny) = moments
    out = PairCounts(n_constant=int((nx == 0).sum()) + (0 if y is None else int((ny == 0).sum())))
    heap: list[tuple[float, int, int]] = []
    if x.shape[0] == 0:
        return out
    for si, sj, task in _block_tasks(x, y, moments, block, tile_rows, _finish_counts, threshold, top_k):
        # delayed objects only in this compute: mixing in dask arrays can misorder results (dask 2026.8.0)
        bins, above, n_pairs, top = dask.compute(task)[0]
        out.bins += bins
        out.above += above
        out.n_pairs += n_pairs
        for r, i, j in top:
            _push(heap, (r, si.start + i, sj.start + j), top_k)
    out.top = sorted(heap, reverse=True)
    return out


def _moments(x: da.Array, y: da.Array | None) -> tuple[Moments, Moments]:
    mx = column_moments(x)
    return mx, (mx if y is None else column_moments(y))


def _push(heap: list[tuple[float, int, int]], item: tuple[float, int, int], k: int) -> None:
    if len(heap) < k:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def per_example_means(x: da.Array, example_id: np.ndarray, n_examples: int) -> da.Array:
    """``(examples, neurons)`` mean activation of each example's tokens (the per-example option).

    Each row chunk sums its runs of equal ``example_id`` with ``np.add.reduceat`` (examples occupy
    consecutive rows; an example split across chunks gets two partial sums, added when assembling).
    """
    x1 = x.rechunk({1: x.shape[1]})
    bounds = np.cumsum([0, *x1.chunks[0]])
    parts = [
        dask.delayed(_example_sums)(block, example_id[r0:r1])
        for block, r0, r1 in zip(x1.to_delayed()[:, 0], bounds[:-1], bounds[1:], strict=True)
    ]
    counts = np.bincount(example_id, minlength=n_examples).astype(np.float64)
    means = dask.delayed(_assemble)(parts, np.maximum(counts, 1), n_examples, x.shape[1])
    return da.from_delayed(means, shape=(n_examples, x.shape[1]), dtype=np.float64)


def _example_sums(block: np.ndarray, example_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, sums)``: float64 sums of each run of equal ids in ``block`` (rows, neurons)."""
    if len(example_id) == 0:
        return example_id[:0], np.zeros((0, block.shape[1]))
    starts = np.flatnonzero(np.r_[True, example_id[1:] != example_id[:-1]])
    return example_id[starts], np.add.reduceat(block.astype(np.float64), starts, axis=0)


def _assemble(
    parts: list[tuple[np.ndarray, np.ndarray]], counts: np.ndarray, n_examples: int, d: int
) -> np.ndarray:
    out = np.zeros((n_examples, d), dtype=np.float64)
    for ids, sums in parts:
        np.add.at(out, ids, sums)  # one row per run, so this touches (runs, d) values, not every token
    out /= counts[:, None]
    return out


def block_for_memory(n_neurons: int, memory_limit: int | None, default: int = 2048) -> int:
    """Largest column block whose working set (a few b x b float64 blocks) fits a quarter of the limit."""
    if memory_limit is None:
        return min(n_neurons, default)
    b = int(np.sqrt(memory_limit / 4 / (3 * 8)))
    return max(64, min(n_neurons, b))
