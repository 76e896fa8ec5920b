"""Dead neurons (the paper's sections 2.4 and 4.4): one streaming pass per layer over the store.

A neuron is dead when every cached activation lies in ``[-threshold, threshold]`` (default 0.1, the paper's
rule for GELU/SiLU); under ReLU the paper asks for exactly 0 (``relu_eps = 0``; the authors' code used
``|a| < 1e-6``). The same pass yields per-neuron min, max, mean, std and the fraction of near-zero values.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from .block_stats import block_stats
from .scheduler import pairwise_reduce

RELU_NAMES = ("relu",)


@dataclass(frozen=True)
class DeadRule:
    threshold: float = 0.1  # |a| <= threshold counts as near zero (non-ReLU)
    relu_eps: float = 0.0  # ReLU: dead iff every |a| <= relu_eps (0: exactly zero)

    def bound(self, activation: str) -> float:
        return self.relu_eps if activation.lower() in RELU_NAMES else self.threshold


@dataclass(frozen=True)
class NeuronStats:
    """Per-neuron statistics of one layer, each ``(neurons,)``."""

    minimum: np.ndarray
    maximum: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    frac_near_zero: np.ndarray
    dead: np.ndarray
    n_tokens: int
    n_nonfinite: np.ndarray
    bound: float


TILE_ROWS = 64  # (64, neurons<=2048) float64 tile: ~1 MB, stays in cache across the passes below
FIELDS = ("n", "mean", "m2", "min", "max", "near")  # rows of a partial-statistics array


def _tile_stats(t: np.ndarray, bound: float) -> np.ndarray:
    """(6, neurons) float64 statistics of one (rows, neurons) float64 tile; non-finite values left out."""
    s = t.sum(axis=0)
    if np.isfinite(s).all():  # the common case: one cheap test instead of masks everywhere
        n = np.full(t.shape[1], float(t.shape[0]))
        mean = s / n
        d = t - mean
        d *= d
        return np.stack(
            [n, mean, d.sum(axis=0), t.min(axis=0), t.max(axis=0), (np.abs(t) <= bound).sum(axis=0)]
        )
    finite = np.isfinite(t)
    n = finite.sum(axis=0).astype(np.float64)
    clean = np.where(finite, t, 0.0)
    mean = clean.sum(axis=0) / np.maximum(n, 1)
    d = np.where(finite, t - mean, 0.0)
    with np.errstate(invalid="ignore"):
        lo = np.where(finite, t, np.inf).min(axis=0)
        hi = np.where(finite, t, -np.inf).max(axis=0)
    near = ((np.abs(clean) <= bound) & finite).sum(axis=0)
    return np.stack([n, mean, (d * d).sum(axis=0), lo, hi, near])


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al.'s pairwise combination of two partial-statistics arrays (exact mean and M2)."""
    n = a[0] + b[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(n > 0, b[0] / n, 0.0)
    delta = b[1] - a[1]
    return np.stack(
        [
            n,
            a[1] + delta * w,
            a[2] + b[2] + delta * delta * a[0] * w,
            np.minimum(a[3], b[3]),
            np.maximum(a[4], b[4]),
            a[5] + b[5],
        ]
    )


def _chunk_stats(block: np.ndarray, bound: float) -> np.ndarray:
    """(6, neurons) statistics of one store chunk: the fast path, or float64 tiles where it declines."""
    fast = block_stats(block, bound)
    return fast if fast is not None else _careful_stats(block, bound)


def _careful_stats(block: np.ndarray, bound: float) -> np.ndarray:
    """(6, neurons) statistics in cache-sized float64 row tiles, leaving inf and NaN out."""
    out = None
    for r0 in range(0, block.shape[0], TILE_ROWS):
        part = _tile_stats(block[r0 : r0 + TILE_ROWS].astype(np.float64), bound)
        out = part if out is None else _merge(out, part)
    return out if out is not None else _empty(block.shape[1])


def _empty(d: int) -> np.ndarray:
    return np.stack(
        [np.zeros(d), np.zeros(d), np.zeros(d), np.full(d, np.inf), np.full(d, -np.inf), np.zeros(d)]
    )


def _column_stats(parts: list[Delayed], d: int) -> Delayed:
    return pairwise_reduce(parts, _merge, fan_in=16) if parts else dask.delayed(_empty)(d)


def neuron_stats(x: da.Array, activation: str, rule: DeadRule = DeadRule()) -> NeuronStats:
    """Compute the statistics of one layer's activations ``x`` (tokens, neurons) in one pass.

    Each store chunk is scanned in one compiled pass (``analyze.block_stats``: min, max, mean, centered
    sum of squares, near-zero count; float64 tiles for a chunk holding inf/NaN), and the chunks' partials
    are merged with Chan's formula, up to 16 per task: one delayed graph, one compute.
    """
    bound = rule.bound(activation)
    return finish_stats(column_statistics(x, bound), x.shape[0], bound)


def column_statistics(x: da.Array, bound: float = 0.0) -> np.ndarray:
    """``(6, neurons)`` float64 statistics (rows ``FIELDS``: n, mean, m2, min, max, near) of ``x`` (tokens,
    neurons) over its finite values, in one streaming pass (see ``neuron_stats``); ``near`` counts
    ``|a| <= bound``. ``m2`` is the centred sum of squares, exact to float64 rounding."""
    # one task per chunk reduces it to (6, neurons); unoptimized: array graph fusion costs more than it saves
    partials = x.map_blocks(
        _chunk_stats, bound, chunks=((6,) * x.numblocks[0], x.chunks[1]), meta=np.empty((0, 0))
    )
    blocks = partials.to_delayed(optimize_graph=False)  # (row chunks, column chunks)
    widths = x.chunks[1]
    tasks = [_column_stats(list(blocks[:, j]), widths[j]) for j in range(blocks.shape[1])]
    cols = dask.compute(*tasks)  # delayed objects only
    return np.concatenate(cols, axis=1) if cols else _empty(0)


def finish_stats(r: np.ndarray, n_tokens: int, bound: float) -> NeuronStats:
    """Per-neuron statistics from the merged (6, neurons) partial array."""
    n = r[0]
    var = r[2] / np.maximum(n, 1)
    near = r[5]
    # dead: every value within the bound, and no non-finite value at all
    dead = (near == n_tokens) & (n_tokens > 0)
    empty = n == 0
    return NeuronStats(
        minimum=np.where(empty, np.nan, r[3]),
        maximum=np.where(empty, np.nan, r[4]),
        mean=np.where(empty, 0.0, r[1]),
        std=np.sqrt(var),
        frac_near_zero=near / max(n_tokens, 1),
        dead=dead,
        n_tokens=n_tokens,
        n_nonfinite=(n_tokens - n).astype(np.int64),
        bound=bound,
    )
