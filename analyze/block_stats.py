"""Per-neuron statistics of one stored chunk in one compiled pass, fast on two cores.

A chunk is ``(rows, neurons)`` float16 or float32. The result is the ``(6, neurons)`` float64 partial
``n, mean, m2, min, max, near`` that ``analyze.dead`` merges across chunks (``m2``: centered sum of
squares). One numba kernel walks the chunk row by row and releases the GIL, so Dask's threads scale:

* a float16 row is converted exactly to float32 from its bits (sign-extend, shift into float32's exponent
  and mantissa, rescale by 2**112; inf and NaN come out as finite values of magnitude >= 2**16);
* min and max are exact; ``|a| <= bound`` is compared against the largest value of the chunk's dtype not
  above the bound, so it decides as a float64 comparison would;
* sums run in float64 on values shifted by the chunk's first row, ``y = a - a[0]``, which is exact for
  float16 and float32 data. Because ``a[0]`` is one of the values, ``(mean - a[0])**2 <= m2``, so
  ``m2 = sum(y*y) - sum(y)**2 / n`` loses at most about ``n`` float64 roundings relative to ``m2``.

A chunk holding inf or NaN returns None; the caller then uses its float64 path that leaves them out.
"""

from __future__ import annotations

import numba
import numpy as np

_REBIAS = np.float32(2.0**112)  # float16 exponent bias 15 -> float32 bias 127
_CLEAR = np.int32(~0x70000000)  # bits 28-30 the sign extension leaves set in negative values
_KERNEL = {"nogil": True, "cache": True, "boundscheck": False}


def below_bound(bound: float, dtype: np.dtype) -> np.float32:
    """Largest value of ``dtype`` not above ``bound`` (>= 0), as float32: ``|a| <= bound`` iff below it."""
    b = np.asarray(min(bound, float(np.finfo(dtype).max)), dtype=dtype)
    if float(b) > bound:
        b = np.nextafter(b, dtype.type(0))
    return np.float32(b)


@numba.njit(inline="always", **_KERNEL)
def _widen_half(bits: np.ndarray, out: np.ndarray) -> None:
    """float16 ``bits`` (int16) into float32 bit patterns ``out`` (int32) worth 2**-112 times the value."""
    for j in range(bits.shape[0]):
        out[j] = (np.int32(bits[j]) << 13) & _CLEAR


@numba.njit(inline="always", **_KERNEL)
def _add_rows(v, u, scale, limit, shift, lo_in, hi_in, lo_out, hi_out, near, s, ss):  # type: ignore[no-untyped-def]
    """Fold two rows, ``v * scale`` and ``u * scale`` (exact), into the running statistics.

    Two rows per pass halve the loads and stores of the accumulators. Min and max go from ``*_in`` to
    ``*_out`` (the caller swaps them): updating one array in place compiles to masked stores, several
    times slower on some x86 cores. Pass ``u`` = ``v`` for a single row and undo its second count.
    """
    for j in range(v.shape[0]):
        x = v[j] * scale
        z = u[j] * scale
        small = x if x < z else z
        big = x if x > z else z
        a = lo_in[j]
        lo_out[j] = a if a < small else small
        b = hi_in[j]
        hi_out[j] = b if b > big else big
        near[j] += np.int32(abs(x) <= limit) + np.int32(abs(z) <= limit)
        y = np.float64(x) - shift[j]
        q = np.float64(z) - shift[j]
        s[j] += y + q
        ss[j] += y * y + q * q


@numba.njit(**_KERNEL)
def _start(first: np.ndarray) -> tuple:
    d = first.shape[0]
    lo, hi = np.empty((2, d), np.float32), np.empty((2, d), np.float32)
    lo[0], hi[0] = first, first
    return lo, hi, first.astype(np.float64), np.zeros(d, np.int32), np.zeros(d), np.zeros(d)


@numba.njit(inline="always", **_KERNEL)
def _drop_row(v, scale, limit, shift, near, s, ss):  # type: ignore[no-untyped-def]
    """Take back the second count of a row folded in as both ``v`` and ``u`` (an odd chunk's last)."""
    for j in range(v.shape[0]):
        x = v[j] * scale
        near[j] -= np.int32(abs(x) <= limit)
        y = np.float64(x) - shift[j]
        s[j] -= y
        ss[j] -= y * y


# float16 rows hold no inf or NaN once widened (see the module docstring), so the fast-math flags are safe
@numba.njit(fastmath={"contract", "nnan", "ninf", "nsz"}, **_KERNEL)
def _scan_half(bits: np.ndarray, limit: np.float32) -> tuple:
    """Running statistics of C-contiguous float16 ``bits`` (int16, rows >= 1)."""
    rows, d = bits.shape
    w = np.empty((2, d), np.int32)
    v = w.view(np.float32)
    _widen_half(bits[0], w[0])
    lo, hi, shift, near, s, ss = _start(v[0] * _REBIAS)
    k = 0
    for i in range(0, rows, 2):
        _widen_half(bits[i], w[0])
        _widen_half(bits[min(i + 1, rows - 1)], w[1])
        _add_rows(v[0], v[1], _REBIAS, limit, shift, lo[k], hi[k], lo[1 - k], hi[1 - k], near, s, ss)
        k = 1 - k
    if rows % 2:
        _drop_row(v[1], _REBIAS, limit, shift, near, s, ss)
    return lo[k], hi[k], near, shift, s, ss


@numba.njit(fastmath={"contract"}, **_KERNEL)
def _scan_float(x: np.ndarray, limit: np.float32) -> tuple:
    """Running statistics of a C-contiguous float32 chunk (rows >= 1)."""
    rows = x.shape[0]
    lo, hi, shift, near, s, ss = _start(x[0])
    k = 0
    one = np.float32(1.0)
    for i in range(0, rows, 2):
        u = x[min(i + 1, rows - 1)]
        _add_rows(x[i], u, one, limit, shift, lo[k], hi[k], lo[1 - k], hi[1 - k], near, s, ss)
        k = 1 - k
    if rows % 2:
        _drop_row(x[rows - 1], one, limit, shift, near, s, ss)
    return lo[k], hi[k], near, shift, s, ss


def block_stats(block: np.ndarray, bound: float) -> np.ndarray | None:
    """``(6, neurons)`` float64 statistics of a float16/float32 chunk, or None if it holds inf/NaN."""
    if block.dtype not in (np.float16, np.float32):
        return None
    rows, d = block.shape
    if not rows:
        inf = np.full(d, np.inf)
        return np.stack([np.zeros(d), np.zeros(d), np.zeros(d), inf, -inf, np.zeros(d)])
    half = block.dtype == np.float16
    x = np.ascontiguousarray(block)
    limit = below_bound(bound, block.dtype)
    lo, hi, near, shift, s, ss = _scan_half(x.view(np.int16), limit) if half else _scan_float(x, limit)
    if not (np.isfinite(s).all() and np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None
    if half and max(-lo.min(), hi.max()) >= 2.0**16:  # inf/NaN bits convert to >= 2**16
        return None
    mean = shift + s / rows
    m2 = np.maximum(ss - s * s / rows, 0.0)
    return np.stack([np.full(d, float(rows)), mean, m2, lo, hi, near], dtype=np.float64)
