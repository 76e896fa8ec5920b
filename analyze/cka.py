"""Linear centred kernel alignment (CKA) between two representations of the same tokens, out of core.

Kornblith, Norouzi, Lee and Hinton (2019), *Similarity of Neural Network Representations Revisited*
(ICML), eq. (5), in feature space: for ``X`` (N, Dx) and ``Y`` (N, Dy) on the same N rows, with ``Xc``,
``Yc`` their column-centred copies,

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),

in [0, 1], 1 for identical inputs, invariant to an orthogonal transform and an isotropic scaling of either
side (not to arbitrary invertible linear maps). The three Gram products come from ``analyze.gram``: row
tiles streamed from the store once per pass, float32 (default) or float64 products, float64 sums; only
scalars leave the tasks and nothing N x D is ever held.

**Debiased** (``debiased=True``): Nguyen, Raghu and Kornblith (2021), *Do Wide and Deep Networks Learn
the Same Things?* (ICLR), replace HSIC by the unbiased estimator of Song et al. (2012),

    HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3)),

with ``K~``, ``L~`` the N x N Gram matrices ``Xc Xc^T``, ``Yc Yc^T`` with their diagonals set to zero. For
centred data ``1^T Xc = 0``, so with ``k_t = ||Xc[t]||^2`` and ``l_t = ||Yc[t]||^2``: ``tr(K~ L~) =
||Yc^T Xc||_F^2 - k.l``, ``1^T K~ 1 = -sum k``, ``K~ 1 = -k``, hence the feature-space form

    n (n-3) HSIC_1 = ||Yc^T Xc||_F^2 - n/(n-2) k.l + (sum k)(sum l) / ((n-1)(n-2)),

which needs, beyond the three Grams, the scalars ``sum k``, ``k.k``, ``k.l``, ``sum l``, ``l.l``: one more
streaming pass over both inputs (O(N D) work, one row tile of each in memory), not the N x N matrices.
The estimator is invariant to shifting either side (tested), so centring first changes nothing.

Rows must align: ``linear_cka`` refuses inputs of different lengths, ``run_cka`` runs whose token index
differs. A non-finite activation makes the result NaN.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from qcache.store import Run
from qcache.store.errors import DataError, InvalidOption

from . import gram
from .dead import column_statistics
from .drift import mismatch
from .scheduler import pairwise_reduce

ROW_TILE = 1024  # rows per tile of the row-norm pass (a debiased option): two (rows, D) float64 tiles


@dataclass(frozen=True)
class SelfTerms:
    """What CKA needs of one side alone (reusable: a baseline layer against many methods).

    ``mean``: (D,) float64 column means (NaN where a column holds inf/NaN); ``gram_sq``:
    ``||Xc^T Xc||_F^2``; ``sum_k`` and ``sum_kk``: ``sum_t k_t`` and ``sum_t k_t^2`` with ``k_t`` the
    squared norm of centred row ``t`` (only when computed for the debiased variant).
    """

    n: int
    mean: np.ndarray
    gram_sq: float
    precision: str
    sum_k: float | None = None
    sum_kk: float | None = None


@dataclass(frozen=True)
class CKAResult:
    """Linear CKA of one pair, the debiased one when asked (else None), and the terms behind them."""

    cka: float
    cka_debiased: float | None
    cross_sq: float  # ||Yc^T Xc||_F^2
    x: SelfTerms
    y: SelfTerms
    sum_kl: float | None = None  # sum_t k_t l_t (debiased only)


def _centres(mean: np.ndarray, precision: str) -> np.ndarray:
    dtype = gram.PRECISIONS[precision]
    return np.nan_to_num(mean, nan=0.0).astype(dtype)


def _means(x: da.Array) -> np.ndarray:
    """(D,) float64 column means, NaN for a column holding inf or NaN (``dead.column_statistics``)."""
    st = column_statistics(x)
    return np.where(st[0] == x.shape[0], st[1], np.nan)


def _finish_squares(
    accs: list[np.ndarray], panels: tuple[gram.Panel, ...], n: int, shifts: dict[str, np.ndarray]
) -> dict[str, float]:
    """Squared Frobenius norm per product of one pass (``gram.square_sum`` of each panel)."""
    out: dict[str, float] = {}
    for acc, p in zip(accs, panels, strict=True):
        left, right = {"xx": ("x", "x"), "yy": ("y", "y"), "xy": ("x", "y")}[p.kind]
        si, sj = shifts[left][slice(*p.left)], shifts[right][slice(*p.right)]
        out[p.kind] = out.get(p.kind, 0.0) + gram.square_sum(acc, p, n, si, sj)
    return out


def _row_sums(x: gram.Source, y: gram.Source | None, r0: int, r1: int, rows: int) -> np.ndarray:
    """``[sum k, sum k^2, sum l, sum l^2, sum k l]`` over rows ``[r0, r1)``, centred in float64."""
    out = np.zeros(5)
    for t0 in range(r0, r1, rows):
        t1 = min(t0 + rows, r1)
        a = x.tile(t0, t1, 0, x.array.shape[1], np.float64)
        k = np.einsum("ij,ij->i", a, a)
        out[0] += k.sum()
        out[1] += k @ k
        if y is not None:
            b = y.tile(t0, t1, 0, y.array.shape[1], np.float64)
            lv = np.einsum("ij,ij->i", b, b)
            out[2] += lv.sum()
            out[3] += lv @ lv
            out[4] += k @ lv
    return out


def _row_terms(x: da.Array, y: da.Array | None, mx: np.ndarray, my: np.ndarray | None) -> np.ndarray:
    """The five row-norm sums of ``_row_sums`` over every row, one task per group of rows."""
    n = x.shape[0]
    rows = gram.tile_rows_for(x, ROW_TILE)
    g = max(1, min(gram.workers(), -(-n // rows)))
    cuts = (np.linspace(0, -(-n // rows), g + 1).round().astype(int) * rows).clip(0, n)
    sx = gram.Source(x, np.nan_to_num(mx, nan=0.0))
    sy = None if y is None or my is None else gram.Source(y, np.nan_to_num(my, nan=0.0))
    parts = [
        dask.delayed(_row_sums)(sx, sy, int(a), int(b), rows) for a, b in itertools.pairwise(cuts) if a < b
    ]
    if not parts:
        return np.zeros(5)
    return dask.compute(pairwise_reduce(parts, np.add))[0]


def _hsic1(cross_sq: float, kl: float, sum_k: float, sum_l: float, n: int) -> float:
    """``n (n-3) HSIC_1``, the feature-space form of the unbiased estimator (module docstring)."""
    return cross_sq - n / (n - 2) * kl + sum_k * sum_l / ((n - 1) * (n - 2))


def self_terms(
    x: da.Array,
    *,
    debiased: bool = False,
    precision: str = "float32",
    memory_limit: int | None = None,
    block: int = gram.BLOCK,
    tile_rows: int = gram.TILE_ROWS,
) -> SelfTerms:
    """``SelfTerms`` of ``x`` (tokens, neurons): ``||Xc^T Xc||_F^2``, and row-norm sums if ``debiased``."""
    mean = _means(x)
    p = gram.plan(
        x.shape[0],
        x.shape[1],
        x.shape[1],
        ("xx",),
        block=block,
        tile_rows=gram.tile_rows_for(x, tile_rows),
        row_unit=gram.row_unit(x),
        budget=memory_limit,
        precision=precision,
        stored_itemsize=x.dtype.itemsize,
    )
    c = _centres(mean, precision)
    shifts = {"x": c - mean, "y": c - mean}
    sq = _run_passes(x, None, (c, None), p, shifts)
    sums = _row_terms(x, None, mean, None) if debiased else None
    return SelfTerms(
        n=x.shape[0],
        mean=mean,
        gram_sq=sq.get("xx", 0.0),
        precision=precision,
        sum_k=None if sums is None else float(sums[0]),
        sum_kk=None if sums is None else float(sums[1]),
    )


def recorded_terms(
    x: da.Array, gram_sq: float, precision: str, sum_k: float | None = None, sum_kk: float | None = None
) -> SelfTerms:
    """``SelfTerms`` of ``x`` from a recorded ``||Xc^T Xc||_F^2`` (the ``gram_terms`` table) and the column
    means, computed here in one pass over ``x`` (O(N D), no product)."""
    return SelfTerms(x.shape[0], _means(x), float(gram_sq), precision, sum_k, sum_kk)


def _run_passes(
    x: da.Array,
    y: da.Array | None,
    centres: tuple[np.ndarray, np.ndarray | None],
    p: gram.Plan,
    shifts: dict[str, np.ndarray],
) -> dict[str, float]:
    total: dict[str, float] = {}
    for task in gram.gram_tasks(x, y, centres, p, _finish_squares, x.shape[0], shifts):
        for kind, v in dask.compute(task)[0].items():  # one pass at a time: one pass's accumulators alive
            total[kind] = total.get(kind, 0.0) + v
    return total


def linear_cka(
    x: da.Array,
    y: da.Array,
    *,
    debiased: bool = False,
    precision: str = "float32",
    x_terms: SelfTerms | None = None,
    y_terms: SelfTerms | None = None,
    memory_limit: int | None = None,
    block: int = gram.BLOCK,
    tile_rows: int = gram.TILE_ROWS,
) -> CKAResult:
    """Linear CKA of ``x`` (N, Dx) and ``y`` (N, Dy), rows aligned (row ``t`` of both: the same token).

    ``x_terms``/``y_terms``: the side's ``SelfTerms`` from an earlier call (``self_terms`` or a previous
    result's ``.x``), so a baseline's own Gram is computed once for many methods. ``precision``:
    ``float32`` (SGEMM products of each tile, float64 sums; about 1e-7 relative) or ``float64``.
    ``memory_limit``: bytes of working memory (default ``gram.DEFAULT_BUDGET``), bounded independently of N.

    Raises:
        DataError: the row counts differ, or fewer than 4 rows for the debiased variant.
        InvalidOption: reused terms of another length, precision or without the debiased sums.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise DataError(
            f"CKA needs the same tokens on both sides: {n} rows against {y.shape[0]}; compare runs of the "
            "same dataset, limit and seed"
        )
    if debiased and n < 4:
        raise DataError(f"debiased CKA needs at least 4 tokens (got {n})")
    for side, t in (("x", x_terms), ("y", y_terms)):
        if t is not None and (t.n != n or t.precision != precision or (debiased and t.sum_k is None)):
            raise InvalidOption(
                f"reused {side} terms are for {t.n} rows at {t.precision}"
                f"{'' if t.sum_k is not None else ' without debiased sums'}; this pair has {n} rows at "
                f"{precision}{' debiased' if debiased else ''}: recompute them"
            )
    mx = x_terms.mean if x_terms is not None else _means(x)
    my = y_terms.mean if y_terms is not None else _means(y)
    kinds = ("xy",) + (("xx",) if x_terms is None else ()) + (("yy",) if y_terms is None else ())
    p = gram.plan(
        n,
        x.shape[1],
        y.shape[1],
        kinds,
        block=block,
        tile_rows=gram.tile_rows_for(x, tile_rows),
        row_unit=gram.row_unit(x),
        budget=memory_limit,
        precision=precision,
        stored_itemsize=max(x.dtype.itemsize, y.dtype.itemsize),
    )
    cx, cy = _centres(mx, precision), _centres(my, precision)
    sq = _run_passes(x, y, (cx, cy), p, {"x": cx - mx, "y": cy - my})
    sums = _row_terms(x, y, mx, my) if debiased else None
    tx = x_terms or SelfTerms(n, mx, sq["xx"], precision, *_pick(sums, 0))
    ty = y_terms or SelfTerms(n, my, sq["yy"], precision, *_pick(sums, 2))
    cross = sq["xy"]
    with np.errstate(invalid="ignore", divide="ignore"):
        value = cross / np.sqrt(tx.gram_sq * ty.gram_sq) if tx.gram_sq > 0 and ty.gram_sq > 0 else np.nan
    unbiased = None
    kl = None if sums is None else float(sums[4])
    if debiased and kl is not None:
        assert None not in (tx.sum_k, tx.sum_kk, ty.sum_k, ty.sum_kk)
        hxy = _hsic1(cross, kl, tx.sum_k, ty.sum_k, n)
        hxx = _hsic1(tx.gram_sq, tx.sum_kk, tx.sum_k, tx.sum_k, n)
        hyy = _hsic1(ty.gram_sq, ty.sum_kk, ty.sum_k, ty.sum_k, n)
        unbiased = float(hxy / np.sqrt(hxx * hyy)) if hxx > 0 and hyy > 0 else float("nan")
    return CKAResult(float(value), unbiased, cross, tx, ty, kl)


def _pick(sums: np.ndarray | None, at: int) -> tuple[float | None, float | None]:
    return (None, None) if sums is None else (float(sums[at]), float(sums[at + 1]))


def run_cka(
    base: Run,
    other: Run,
    layer: int,
    *,
    tap: str = "act",
    debiased: bool = False,
    precision: str = "float32",
    base_terms: SelfTerms | None = None,
    memory_limit: int | None = None,
) -> CKAResult:
    """Linear CKA between one layer of two runs of the same dataset and model, token by token.

    Raises:
        DataError: the runs did not see the same tokens (their token index differs), or are unfinished.
        InvalidName: the layer or tap is not cached in one of them.
    """
    reason = mismatch(base, other)
    if reason is not None:
        raise DataError(f"cannot compare {base.key} with {other.key} token by token: {reason}")
    return linear_cka(
        base.activations(layer, tap),
        other.activations(layer, tap),
        debiased=debiased,
        precision=precision,
        x_terms=base_terms,
        memory_limit=memory_limit,
    )
