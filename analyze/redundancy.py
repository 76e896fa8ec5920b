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
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import dask
import dask.array as da
import numba
import numpy as np

from . import gram
from .dead import column_statistics

N_BINS = 10
EDGES = np.linspace(0.0, 1.0, N_BINS + 1)
TILE_ROWS = gram.TILE_ROWS


@dataclass
class PairCounts:
    """Histogram of |r| over unordered neuron pairs, plus what was left out."""

    bins: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS, dtype=np.int64))
    above: int = 0  # pairs with |r| >= threshold
    n_pairs: int = 0  # pairs counted in bins
    n_constant: int = 0  # neurons with zero variance, excluded
    # ||Xc^T Xc||_F^2 of a layer with itself (None between two layers): the self term linear CKA needs,
    # kept in the ``gram_terms`` table so ``qcache compare`` need not compute this Gram again
    gram_sq: float | None = None
    top: list[tuple[float, int, int]] = field(default_factory=list)  # (|r|, i, j), best first


def column_moments(x: da.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, norm)`` of each column in float64, norm = sqrt(sum (x - mean)^2); NaN for a column holding
    inf or NaN.

    One compiled pass per stored chunk (``dead.column_statistics``: moments shifted by the chunk's first row)
    and Chan's pairwise combination across chunks, so the norm of a neuron with a large mean and a tiny
    spread does not cancel away (``sum x^2 - n mean^2`` would).
    """
    st = column_statistics(x)
    finite = st[0] == x.shape[0]
    return np.where(finite, st[1], np.nan), np.where(finite, np.sqrt(st[2]), np.nan)


Moments = tuple[np.ndarray, np.ndarray]


def _setup(
    x: da.Array,
    y: da.Array | None,
    block: int,
    tile_rows: int,
    memory_limit: int | None,
) -> tuple[da.Array, da.Array | None, tuple[Moments, Moments], gram.Plan, tuple[np.ndarray, np.ndarray]]:
    """The inputs (see ``in_memory_if_one_chunk``), their moments, the Gram plan and float32 centres."""
    x, y = in_memory_if_one_chunk(x), None if y is None else in_memory_if_one_chunk(y)
    mx = column_moments(x)
    my = mx if y is None else column_moments(y)
    plan = gram.plan(
        x.shape[0],
        x.shape[1],
        x.shape[1] if y is None else y.shape[1],
        ("xx",) if y is None else ("xy",),
        block=block,
        tile_rows=gram.tile_rows_for(x, tile_rows),
        row_unit=gram.row_unit(x),
        budget=memory_limit,
        stored_itemsize=x.dtype.itemsize,
    )
    centres = (_centre32(mx[0]), _centre32(my[0]))
    return x, y, (mx, my), plan, centres


def in_memory_if_one_chunk(x: da.Array) -> da.Array:
    """``x`` itself, or, when it is one chunk (e.g. per-example means: one task makes the whole array), that
    chunk computed once and cut into tiles, so streaming its rows does not recompute it per tile."""
    if x.npartitions > 1:
        return x
    return da.from_array(np.asarray(x.compute()), chunks=(TILE_ROWS, -1))


def _centre32(mean: np.ndarray) -> np.ndarray:
    # a column holding inf/NaN has a NaN mean; centre it on 0 (its r is NaN whatever the centre)
    return np.nan_to_num(mean, nan=0.0).astype(np.float32)


def _panel_r(acc: np.ndarray, panel: gram.Panel, n: int, args: tuple) -> np.ndarray:
    """Signed r of one panel's accumulator, in place (inf/nan where a neuron is constant)."""
    shifts, norms = args
    li, ri = slice(*panel.left), slice(*panel.right)
    side = (1, 1) if panel.kind == "yy" else (0, 0) if panel.kind == "xx" else (0, 1)
    acc = gram.centred(acc, n, shifts[side[0]][li], shifts[side[1]][ri])
    with np.errstate(divide="ignore", invalid="ignore"):
        acc /= norms[side[0]][li][:, None]
        acc /= norms[side[1]][ri][None, :]
    return acc


def _finish_counts(
    accs: list[np.ndarray], panels: tuple[gram.Panel, ...], n: int, args: tuple, threshold: float, top_k: int
) -> tuple[np.ndarray, int, int, list[tuple[float, int, int]], float]:
    """Counts of one pass: ``(bins, above, n_pairs, top, gram_sq)``, top with global neuron indices,
    ``gram_sq`` the pass's part of ``||Xc^T Xc||_F^2`` (0 between two layers)."""
    shifts, norms = args
    bins = np.zeros(N_BINS, np.int64)
    above = n_pairs = 0
    gram_sq = 0.0
    top: list[tuple[float, int, int]] = []
    for acc, p in zip(accs, panels, strict=True):
        side = (0, 0) if p.kind == "xx" else (0, 1)
        li, ri = slice(*p.left), slice(*p.right)
        if p.kind == "xx":  # before _panel_r below scales acc in place
            gram_sq += gram.square_sum(acc, p, n, shifts[0][li], shifts[0][ri])
        a, m = _count_panel(
            acc,
            float(n),
            shifts[side[0]][li],
            shifts[side[1]][ri],
            norms[side[0]][li],
            norms[side[1]][ri],
            p.diagonal,
            float(threshold),
            EDGES,
            bins,
        )
        above += a
        n_pairs += m
        if top_k:
            r = np.abs(_panel_r(acc, p, n, args))
            valid = (norms[side[0]][li] > 0)[:, None] & (norms[side[1]][ri] > 0)[None, :] & np.isfinite(r)
            if p.diagonal:
                valid &= np.triu(np.ones(valid.shape, dtype=bool), k=1)  # each unordered pair once
            top += [(v, p.left[0] + i, p.right[0] + j) for v, i, j in _block_top(r, valid, top_k)]
    return bins, above, n_pairs, top, gram_sq


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _count_panel(g, n, si, sj, ni, nj, diagonal, threshold, edges, bins):  # type: ignore[no-untyped-def]
    """Histogram ``|r|`` of one panel into ``bins`` (as ``np.histogram(|r|, edges)``: ``[lo, hi)``, the last
    bin closed); returns ``(pairs >= threshold, pairs counted)``. Constant (norm 0) and non-finite
    neurons are left out; on a diagonal block only pairs above its diagonal count."""
    last = len(edges) - 2
    ok_j = np.empty(g.shape[1], np.bool_)
    inv_j = np.zeros(g.shape[1])
    for j in range(g.shape[1]):
        ok_j[j] = nj[j] > 0 and math.isfinite(nj[j])
        if ok_j[j]:
            inv_j[j] = 1.0 / nj[j]
    counts = np.zeros((4, last + 1), np.int64)  # four interleaved histograms: fewer store-to-load stalls
    above = 0
    for i in range(g.shape[0]):
        if not (ni[i] > 0 and math.isfinite(ni[i])):
            continue
        a = n * si[i]
        for j in range(i + 1 if diagonal else 0, g.shape[1]):
            if not ok_j[j]:
                continue
            v = min(abs((g[i, j] - a * sj[j]) / ni[i] * inv_j[j]), 1.0)  # |r| can exceed 1 by rounding
            if v != v:
                continue
            k = min(int(v * (last + 1)), last)  # the bin, then the edges' own rounding decides
            if v < edges[k]:
                k -= 1
            elif k < last and v >= edges[k + 1]:
                k += 1
            counts[j & 3, k] += 1
            above += v >= threshold
    counted = 0
    for q in range(4):
        for k in range(last + 1):
            bins[k] += counts[q, k]
            counted += counts[q, k]
    return above, counted


def _block_top(r: np.ndarray, valid: np.ndarray, k: int) -> list[tuple[float, int, int]]:
    flat = np.where(valid, r, -1.0).ravel()
    take = min(k, flat.size)
    if take == 0:
        return []
    idx = np.argpartition(flat, -take)[-take:]
    return [
        (float(min(flat[i], 1.0)), int(i) // r.shape[1], int(i) % r.shape[1]) for i in idx if flat[i] >= 0
    ]


def _r_blocks(
    accs: list[np.ndarray], panels: tuple[gram.Panel, ...], n: int, args: tuple, block: int
) -> list[tuple[slice, slice, np.ndarray]]:
    """The signed r of one pass cut into ``(I, J, r_IJ)`` blocks of ``block`` columns."""
    out = []
    for acc, p in zip(accs, panels, strict=True):
        r = _panel_r(acc, p, n, args)
        si = slice(*p.left)
        for c0 in range(0, r.shape[1], block):
            c1 = min(c0 + block, r.shape[1])
            out.append((si, slice(p.right[0] + c0, p.right[0] + c1), r[:, c0:c1]))
    return out


def correlation_blocks(
    x: da.Array, y: da.Array | None = None, *, block: int = 2048, tile_rows: int = TILE_ROWS
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """Yield ``(I, J, r_IJ)``, the signed Pearson r blocks (I <= J within ``x``), a pass at a time.

    For checks and benchmarks; entries of constant neurons are inf or nan.
    """
    x, y, (mx, my), plan, centres = _setup(x, y, block, tile_rows, None)
    args = ((centres[0] - mx[0], centres[1] - my[0]), (mx[1], my[1]))
    b = min(p.shape[0] for pass_ in plan.passes for p in pass_)
    for task in gram.gram_tasks(x, y, centres, plan, _r_blocks, x.shape[0], args, b):
        yield from dask.compute(task)[0]


def correlation_counts(
    x: da.Array,
    y: da.Array | None = None,
    *,
    threshold: float = 0.8,
    block: int = 2048,
    top_k: int = 0,
    tile_rows: int = TILE_ROWS,
    memory_limit: int | None = None,
) -> PairCounts:
    """|r| histogram of all unordered pairs within ``x`` (or all pairs between ``x`` and ``y``).

    ``x``, ``y``: (tokens, neurons) dask arrays; ``block`` columns per panel, ``tile_rows`` rows per
    product, ``memory_limit`` bytes of working memory (default ``gram.DEFAULT_BUDGET``). Each pass of the
    Gram plan is one ``dask.compute`` of delayed tasks whose result is a few counts.
    """
    x, y, moments, plan, centres = _setup(x, y, block, tile_rows, memory_limit)
    (mx, nx), (my, ny) = moments
    out = PairCounts(n_constant=int((nx == 0).sum()) + (0 if y is None else int((ny == 0).sum())))
    heap: list[tuple[float, int, int]] = []
    if x.shape[0] == 0:
        return out
    args = ((centres[0] - mx, centres[1] - my), (nx, ny))
    gram_sq = 0.0
    for task in gram.gram_tasks(x, y, centres, plan, _finish_counts, x.shape[0], args, threshold, top_k):
        # delayed objects only in this compute: mixing in dask arrays can misorder results (dask 2026.8.0)
        bins, above, n_pairs, top, sq = dask.compute(task)[0]
        gram_sq += sq
        out.bins += bins
        out.above += above
        out.n_pairs += n_pairs
        for item in top:
            _push(heap, item, top_k)
    out.top = sorted(heap, reverse=True)
    out.gram_sq = gram_sq if y is None else None
    return out


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
