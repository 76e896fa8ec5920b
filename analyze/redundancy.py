"""Neuron redundancy (the paper's sections 2.5 and 4.5): exact Pearson r of every neuron pair, blockwise.

For a layer X (tokens N, neurons D): one pass computes the column means and standard deviations (float64);
then for each pair of column blocks (I, J), I <= J, the Gram block (X_I - mu_I)^T (X_J - mu_J) is reduced
over row chunks by Dask (float32 products of centered data, so no cancellation), turned into r with the
float64 norms, and immediately histogrammed: only counts (and optionally the top pairs) are kept, never more
than one (b, b) block of the D x D matrix. See docs/design/redundancy.md.

Bins: |r| in [0.0, 0.1), ..., [0.8, 0.9), [0.9, 1.0] (1.0 falls in the last bin). Constant neurons (zero
variance, e.g. dead ReLU neurons) have no correlation: they are counted apart and their pairs are left out.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np

N_BINS = 10
EDGES = np.linspace(0.0, 1.0, N_BINS + 1)


@dataclass
class PairCounts:
    """Histogram of |r| over unordered neuron pairs, plus what was left out."""

    bins: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS, dtype=np.int64))
    above: int = 0  # pairs with |r| >= threshold
    n_pairs: int = 0  # pairs counted in bins
    n_constant: int = 0  # neurons with zero variance, excluded
    top: list[tuple[float, int, int]] = field(default_factory=list)  # (|r|, i, j), best first


def column_moments(x: da.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, norm)`` of each column in float64, norm = sqrt(sum (x - mean)^2)."""
    x64 = x.astype(np.float64)
    s, ss = dask.compute(x64.sum(axis=0), (x64 * x64).sum(axis=0))
    n = x.shape[0]
    mean = s / n
    # second pass-free variance: adequate here because the Gram blocks below use centered data
    norm = np.sqrt(np.maximum(ss - n * mean**2, 0.0))
    return mean, norm


def _blocks(d: int, b: int) -> list[slice]:
    return [slice(i, min(i + b, d)) for i in range(0, d, b)]


def _gram_blocks(
    x: da.Array, y: da.Array, mx: np.ndarray, my: np.ndarray, b: int, same: bool
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """Yield ``(I, J, G_IJ)`` with G the centered cross-product, one block pair at a time."""
    xc = x.astype(np.float32) - mx.astype(np.float32)
    yc = xc if same else y.astype(np.float32) - my.astype(np.float32)
    bx, by = _blocks(x.shape[1], b), _blocks(y.shape[1], b)
    for i, bi in enumerate(bx):
        for bj in by[i:] if same else by:
            gram = da.dot(xc[:, bi].T, yc[:, bj]).compute()  # (b, b): one block of the D x D matrix
            yield bi, bj, np.asarray(gram, dtype=np.float64)


def correlation_counts(
    x: da.Array,
    y: da.Array | None = None,
    *,
    threshold: float = 0.8,
    block: int = 2048,
    top_k: int = 0,
) -> PairCounts:
    """|r| histogram of all unordered pairs within ``x`` (or all pairs between ``x`` and ``y``)."""
    same = y is None
    y = x if y is None else y
    mx, nx = column_moments(x)
    my, ny = (mx, nx) if same else column_moments(y)
    const_x, const_y = nx == 0, ny == 0
    out = PairCounts(n_constant=int(const_x.sum()) + (0 if same else int(const_y.sum())))
    heap: list[tuple[float, int, int]] = []
    for bi, bj, gram in _gram_blocks(x, y, mx, my, block, same):
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.abs(gram / np.outer(nx[bi], ny[bj]))
        valid = ~const_x[bi][:, None] & ~const_y[bj][None, :]
        if same and bi == bj:
            valid &= np.triu(np.ones(valid.shape, dtype=bool), k=1)  # each unordered pair once, no self-pairs
        vals = np.minimum(r[valid], 1.0)  # |r| can exceed 1 by rounding
        out.bins += np.histogram(vals, bins=EDGES)[0]
        out.above += int((vals >= threshold).sum())
        out.n_pairs += int(vals.size)
        if top_k:
            _keep_top(heap, r, valid, bi.start, bj.start, top_k)
    out.top = sorted(heap, reverse=True)
    return out


def _keep_top(
    heap: list[tuple[float, int, int]], r: np.ndarray, valid: np.ndarray, i0: int, j0: int, k: int
) -> None:
    flat = np.where(valid, r, -1.0).ravel()
    take = min(k, flat.size)
    for idx in np.argpartition(flat, -take)[-take:]:
        if flat[idx] < 0:
            continue
        item = (float(min(flat[idx], 1.0)), i0 + int(idx) // r.shape[1], j0 + int(idx) % r.shape[1])
        if len(heap) < k:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)


def per_example_means(x: da.Array, example_id: np.ndarray, n_examples: int) -> da.Array:
    """``(examples, neurons)`` mean activation of each example's tokens (the per-example option)."""
    x1 = x.rechunk({1: x.shape[1]})
    bounds = np.cumsum([0, *x1.chunks[0]])
    parts = [
        da.from_delayed(
            dask.delayed(_example_sums)(block, example_id[r0:r1], n_examples),
            shape=(n_examples, x.shape[1]),
            dtype=np.float64,
        )
        for block, r0, r1 in zip(x1.to_delayed()[:, 0], bounds[:-1], bounds[1:], strict=True)
    ]
    counts = np.bincount(example_id, minlength=n_examples).astype(np.float64)
    return da.stack(parts).sum(axis=0) / np.maximum(counts, 1)[:, None]


def _example_sums(block: np.ndarray, example_id: np.ndarray, n_examples: int) -> np.ndarray:
    out = np.zeros((n_examples, block.shape[1]), dtype=np.float64)
    np.add.at(out, example_id, block.astype(np.float64))
    return out


def block_for_memory(n_neurons: int, memory_limit: int | None, default: int = 2048) -> int:
    """Largest column block whose working set (a few b x b float64 blocks) fits a quarter of the limit."""
    if memory_limit is None:
        return min(n_neurons, default)
    b = int(np.sqrt(memory_limit / 4 / (3 * 8)))
    return max(64, min(n_neurons, b))
