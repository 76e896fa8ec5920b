"""Blockwise Gram products of tall activation matrices, streamed from the store once per pass.

For ``x`` (N, Dx) and ``y`` (N, Dy) on the same N rows (tokens) and column centres ``cx``, ``cy``, the
products of the centred data summed over every row:

* ``xx`` = (x - cx)^T (x - cx), ``yy`` = (y - cy)^T (y - cy): symmetric, kept as its upper block triangle;
* ``xy`` = (x - cx)^T (y - cy).

Columns are cut into blocks of ``b``; a **panel** is a piece of one block row of a product: for
``xx``/``yy`` the diagonal block ``(I, I)`` and, apart, the rest of block row ``I`` (two contiguous
accumulators add faster than two halves of one), for ``xy`` block ``I`` against every column. A **pass**
is a set of panels whose float64 accumulators fit the memory budget. Rows are split into ``groups``, one
Dask task each: one on a threaded scheduler (its BLAS calls already use every core; one per thread when
BLAS is limited to one), one per worker on a distributed cluster. A task streams its rows in tiles of
``tile_rows``: each tile is read from the store and centred **once** (float16 widened exactly through a
65,536-entry table, then ``x - c`` in the product dtype), and every panel of the pass takes its product
from that one buffer (diagonal blocks as a symmetric rank-k update, half the flops), added to float64
accumulators. Groups are summed pairwise, then a ``finish`` task turns the pass's accumulators into a
small result (counts, sums of squares) where they were computed. Before this module each block pair
re-read and re-converted both of its column blocks.

Memory (bytes), bounded independently of N: the pass's accumulators (``8 * sum of panel areas``, for one
pass holding a whole product ``8 (D^2 + D b) / 2`` for ``xx``, ``8 Dx Dy`` for ``xy``), per group, and two
groups' at once while they are summed; one tile (``tile_rows * width * (stored + product itemsize)``,
``width`` the decoded columns of ``x`` and ``y``); the product of one panel before it is added
(``b * D * product itemsize``). ``plan`` keeps the sum under the budget (``--memory-limit``, default 4 GiB):
tiles take at most half of it, and the panels are cut into as many passes as the rest asks (each pass
re-reads the tiles it needs). At D = 11,008, b = 2048, float16 data: about 1.2 GB for redundancy
(575 MB accumulators, 541 MB tile of 8192 rows, 90 MB product), 3.3 GB for a CKA with three Grams.

Products are float32 (``precision="float32"``: BLAS SGEMM/SSYRK, each tile's sum of at most ``tile_rows``
products rounded once, tiles summed in float64) or float64 (``precision="float64"``: to float64 rounding).
In float32 the data are centred on ``float32(mean)``, exact when value and mean are within a factor 2
(Sterbenz); the rounding of the centre, ``s = float32(mean) - mean``, adds exactly ``n s_i s_j`` to every
entry because the centred data sum to zero, which ``centred`` subtracts.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numba
import numpy as np
from dask.delayed import Delayed

from qcache.store.errors import InvalidOption

from .scheduler import pairwise_reduce

TILE_ROWS = 8192  # rows per product: fewer, larger BLAS calls and accumulator sums (measured ~15% faster)
BLOCK = 2048  # columns per block: one stored neuron chunk (store/codecs.py NEURON_CHUNK)
DEFAULT_BUDGET = 4 * 2**30  # working memory without --memory-limit
PRECISIONS = {"float32": np.float32, "float64": np.float64}
KINDS = ("xx", "yy", "xy")
# float16 bit pattern -> float32 value, exact (inf and NaN included): one table lookup per value
_HALF = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)


@dataclass(frozen=True)
class Panel:
    """Block ``I`` (``left`` columns) of product ``kind`` against columns ``right`` of the other operand."""

    kind: str
    left: tuple[int, int]  # [start, stop) columns of the left operand
    right: tuple[int, int]  # [start, stop) columns of the right operand

    @property
    def shape(self) -> tuple[int, int]:
        return self.left[1] - self.left[0], self.right[1] - self.right[0]

    @property
    def nbytes(self) -> int:
        return 8 * self.shape[0] * self.shape[1]

    @property
    def diagonal(self) -> bool:
        """True for a diagonal block ``(I, I)`` of ``xx``/``yy``: symmetric, made by a rank-k update."""
        return self.kind != "xy" and self.left == self.right


@dataclass(frozen=True)
class Plan:
    """Passes of panels and row groups of one Gram computation."""

    passes: tuple[tuple[Panel, ...], ...]
    groups: tuple[tuple[int, int], ...]  # [start, stop) rows of each task
    tile_rows: int
    precision: str

    @property
    def dtype(self) -> type:
        return PRECISIONS[self.precision]


def blocks(d: int, b: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each column block of width ``b`` (the last may be narrower)."""
    return [(i, min(i + b, d)) for i in range(0, d, b)]


def panels(kinds: Iterable[str], dx: int, dy: int, b: int) -> list[Panel]:
    """Every panel of the products ``kinds`` for operands ``dx`` and ``dy`` columns wide."""
    out = []
    for kind in kinds:
        if kind not in KINDS:
            raise InvalidOption(f"Gram product {kind!r} is not one of {', '.join(KINDS)}")
        d = dy if kind == "yy" else dx
        for s, e in blocks(d, b):
            if kind == "xy":
                out.append(Panel(kind, (s, e), (0, dy)))
                continue
            out.append(Panel(kind, (s, e), (s, e)))  # the diagonal block and, apart, the rest of the row:
            if e < d:  # two contiguous accumulators add faster than two halves of one
                out.append(Panel(kind, (s, e), (e, d)))
    return out


def workers() -> int:
    """Row groups to run at once: a distributed client's workers; on the threaded scheduler its threads
    divided by BLAS's (one group by default: its BLAS calls already keep every core busy, and two
    concurrent products were measured slower; with ``OPENBLAS_NUM_THREADS=1``, one group per thread)."""
    try:
        from distributed import default_client

        return max(1, len(default_client().scheduler_info()["workers"]))
    except (ImportError, ValueError):
        pass
    if dask.config.get("scheduler", None) in ("sync", "synchronous", "single-threaded"):
        return 1
    threads = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    return max(1, threads // blas_threads())


def blas_threads() -> int:
    """Threads BLAS uses, as its environment variables set them (else one per core)."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def plan(
    n: int,
    dx: int,
    dy: int,
    kinds: Iterable[str],
    *,
    block: int = BLOCK,
    tile_rows: int = TILE_ROWS,
    row_unit: int = 1,
    budget: int | None = None,
    groups: int | None = None,
    precision: str = "float32",
    stored_itemsize: int = 2,
) -> Plan:
    """Cut the panels of ``kinds`` into passes and the ``n`` rows into groups that fit ``budget`` bytes.

    Tiles take at most half the budget (``tile_rows`` shrinks, in whole ``row_unit`` store chunks); the
    accumulators of a pass the rest. Fewer groups come before more passes (a group is parallelism, a
    pass one more read of the data), and a narrower ``block`` before refusing. Raises InvalidOption when
    not even a 64-column panel and a one-chunk tile fit.
    """
    if precision not in PRECISIONS:
        raise InvalidOption(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    kinds = tuple(kinds)
    budget = DEFAULT_BUDGET if budget is None else int(budget)
    width = dx + (dy if any(k != "xx" for k in kinds) else 0)
    # a tile as stored and centred, and the product of one panel before it is added (block columns by the
    # operand's width)
    item = np.dtype(PRECISIONS[precision]).itemsize
    per_row = width * (stored_itemsize + item)
    unit = max(1, row_unit)
    rows = max(1, min(tile_rows, n))
    while rows > unit and rows * per_row > budget // 2:
        rows = max(unit, (rows // 2) // unit * unit)
    tile = rows * per_row + block * max(dx, dy) * item
    n_tiles = max(1, -(-n // rows))
    widest = max(dx, dy)
    g = max(1, min(groups or workers(), n_tiles))

    def room(g: int) -> int:  # accumulator bytes per group: the pairwise sum holds two groups' at once
        return (budget - g * tile) // (g + (1 if g > 1 else 0))

    total = sum(p.nbytes for p in panels(kinds, dx, dy, block))
    while g > 1 and room(g) < total:
        g -= 1
    b = block
    while b > 64 and 8 * b * widest > room(g):
        b = max(64, b // 2)
    if 8 * b * widest > room(g):
        raise InvalidOption(
            f"--memory-limit {budget / 2**20:.1f} MiB is too small for a {b}-column panel and a {rows}-row "
            f"tile of {width} columns (about {(8 * b * widest + tile) / 2**20:.1f} MiB): raise it"
        )
    passes: list[list[Panel]] = [[]]
    used = 0
    for p in panels(kinds, dx, dy, b):
        if used + p.nbytes > room(g) and passes[-1]:
            passes.append([])
            used = 0
        passes[-1].append(p)
        used += p.nbytes
    cuts = np.linspace(0, n_tiles, g + 1).round().astype(int) * rows
    spans = [(int(a), int(min(c, n))) for a, c in itertools.pairwise(cuts) if a < min(c, n)]
    return Plan(tuple(tuple(p) for p in passes), tuple(spans) or ((0, 0),), rows, precision)


class Source:
    """A lazy ``(N, D)`` array handed to a task unevaluated (``dask.delayed`` would compute a dask array
    argument in full; a plain object is passed as is), with the centre to subtract."""

    def __init__(self, array: da.Array, centre: np.ndarray) -> None:
        self.array = array
        self.centre = centre

    def tile(self, r0: int, r1: int, c0: int, c1: int, dtype: type) -> np.ndarray:
        """Rows ``[r0, r1)``, columns ``[c0, c1)``, centred, as a C-contiguous ``dtype`` array."""
        raw = np.asarray(self.array[r0:r1, c0:c1].compute(scheduler="sync"))
        return centre(raw, self.centre[c0:c1], dtype)


def centre(raw: np.ndarray, c: np.ndarray, dtype: type) -> np.ndarray:
    """``raw - c`` in ``dtype``: float16 widened exactly by table, anything else cast by numpy."""
    c = np.ascontiguousarray(c, dtype=dtype)
    if raw.dtype == np.float16 and raw.size:
        out = np.empty(raw.shape, dtype=dtype)
        _centre_half(np.ascontiguousarray(raw).view(np.uint16), _HALF, c, out)
        return out
    out = raw.astype(dtype)
    out -= c
    return out


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _centre_half(bits: np.ndarray, table: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    rows, cols = bits.shape
    for i in range(rows):
        for j in range(cols):
            out[i, j] = table[bits[i, j]] - c[j]


def _columns(pass_: tuple[Panel, ...], side: str) -> tuple[int, int] | None:
    """``[c0, c1)`` columns of ``x`` (``side`` 'x') or ``y`` the panels of a pass read, or None."""
    spans = []
    for p in pass_:
        if (p.kind, side) in (("xx", "x"), ("yy", "y")):
            spans.append((p.left[0], p.right[1]))
        elif p.kind == "xy":
            spans.append(p.left if side == "x" else p.right)
    return (min(s for s, _ in spans), max(e for _, e in spans)) if spans else None


def _stream(x: Source, y: Source | None, pass_: tuple[Panel, ...], r0: int, r1: int, plan_: Plan) -> list:
    """Float64 accumulators of the panels of one pass over rows ``[r0, r1)``: each tile is read once.

    Tiles are read in this thread, between products: reading the next one in a second thread while BLAS
    multiplies was measured slower on two cores (the reader takes a core from BLAS's threads, which then
    wait for each other)."""
    acc = [np.zeros(p.shape) for p in pass_]
    cols = {"x": _columns(pass_, "x"), "y": _columns(pass_, "y")}
    for t0 in range(r0, r1, plan_.tile_rows):
        t1 = min(t0 + plan_.tile_rows, r1)
        tiles = {}
        for side, src in (("x", x), ("y", y)):
            span = cols[side]
            if span is not None and src is not None:
                tiles[side] = (src.tile(t0, t1, *span, plan_.dtype), span[0])
        _multiply(tiles, pass_, acc)
    return acc


def _multiply(tiles: dict[str, tuple[np.ndarray, int]], pass_: tuple[Panel, ...], acc: list) -> None:
    """Add one tile's products to the accumulators of every panel of a pass."""
    for p, a in zip(pass_, acc, strict=True):
        left, lo = tiles["y" if p.kind == "yy" else "x"]
        right, ro = tiles["x" if p.kind == "xx" else "y"]
        li = left[:, p.left[0] - lo : p.left[1] - lo]
        if p.diagonal:
            a += li.T @ li  # numpy hands the transpose of one buffer to SYRK: half the flops
        else:
            a += li.T @ right[:, p.right[0] - ro : p.right[1] - ro]


def _add(a: list, b: list) -> list:
    for u, v in zip(a, b, strict=True):
        u += v
    return a


def gram_tasks(
    x: da.Array,
    y: da.Array | None,
    centres: tuple[np.ndarray, np.ndarray | None],
    plan_: Plan,
    finish: Callable[..., Any],
    *args: Any,
) -> list[Delayed]:
    """One delayed ``finish(accumulators, panels, *args)`` per pass of ``plan_``.

    ``centres``: the ``(Dx,)`` and ``(Dy,)`` vectors subtracted (in the plan's dtype). Compute the tasks one
    at a time to hold one pass's accumulators at once.
    """
    sx = Source(x, centres[0])
    sy = None if y is None else Source(y, centres[1])
    out = []
    for pass_ in plan_.passes:
        parts = [dask.delayed(_stream)(sx, sy, pass_, r0, r1, plan_) for r0, r1 in plan_.groups]
        out.append(dask.delayed(finish)(pairwise_reduce(parts, _add), pass_, *args))
    return out


def centred(block: np.ndarray, n: int, shift_i: np.ndarray, shift_j: np.ndarray) -> np.ndarray:
    """The Gram block of data centred on their exact means, in place, from one centred on ``mean + shift``:
    since ``sum (x - mean) = 0``, the shifted product is the centred one plus ``n shift_i shift_j^T``."""
    if shift_i.any() and shift_j.any():
        block -= n * np.outer(shift_i, shift_j)
    return block


def square_sum(acc: np.ndarray, panel: Panel, n: int, shift_l: np.ndarray, shift_r: np.ndarray) -> float:
    """Squared Frobenius norm of one panel's exactly centred block (``centred`` applied a column slice at a
    time, on copies: small temporaries, ``acc`` unchanged); an off-diagonal panel of ``xx``/``yy`` counts
    twice, for its mirror image below the diagonal. ``shift_l``/``shift_r``: the shifts of the panel's
    left and right columns. Summed over a product's panels this is ``||Xc^T Yc||_F^2``, CKA's input."""
    weight = 2.0 if panel.kind != "xy" and not panel.diagonal else 1.0
    total = 0.0
    for c0 in range(0, acc.shape[1], BLOCK):
        c1 = min(c0 + BLOCK, acc.shape[1])
        part = centred(acc[:, c0:c1].copy(), n, shift_l, shift_r[c0:c1])
        total += float(np.vdot(part, part))
    return weight * total


def row_unit(x: da.Array) -> int:
    """Rows of one chunk of ``x`` when its row chunks are regular (tiles then read whole chunks), else 1."""
    c = x.chunks[0]
    return int(c[0]) if c and len(set(c[:-1])) <= 1 else 1


def tile_rows_for(x: da.Array, tile_rows: int = TILE_ROWS) -> int:
    """``tile_rows`` rounded down to whole row chunks of ``x`` (at least one chunk)."""
    u = row_unit(x)
    return max(u, tile_rows // u * u)
