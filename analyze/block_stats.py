"""Per-neuron statistics of one stored chunk, fast on two cores.

A chunk is ``(rows, neurons)`` float16 or float32. The result is the ``(6, neurons)`` float64 partial
``n, mean, m2, min, max, near`` that ``analyze.dead`` merges across chunks (``m2``: centered sum of
squares). The float16 path never uses numpy's float16 arithmetic, which is scalar code:

* each float16 tile of ``TILE_ROWS`` rows is converted exactly to float32 from its bits (sign-extend,
  shift into float32's exponent and mantissa, rescale by 2**112) into a buffer that stays in cache;
* min and max are exact on those values; ``|a| <= bound`` is decided on the magnitude bits against the
  largest float16 not above the bound (so it decides as a float64 comparison would), and counted eight
  columns per uint64 add;
* mean and ``m2`` use the corrected two-pass algorithm per tile and the parallel-variance formula in
  float64 across tiles.

A chunk holding inf or NaN returns None; the caller then uses its float64 path that leaves them out.
"""

from __future__ import annotations

import threading

import numpy as np

TILE_ROWS = 128  # fastest of 16-512 measured on 2 cores; must stay < 256 (see _count_rows)
_REBIAS = np.float32(2.0**112)  # float16 exponent bias 15 -> float32 bias 127
_CLEAR = np.int32(~0x70000000)  # bits 28-30 the sign extension leaves set in negative values


def below_bound(bound: float, dtype: np.dtype) -> np.float32:
    """Largest value of ``dtype`` not above ``bound`` (>= 0), as float32: ``|a| <= bound`` iff below it."""
    b = np.asarray(min(bound, float(np.finfo(dtype).max)), dtype=dtype)
    if float(b) > bound:
        b = np.nextafter(b, dtype.type(0))
    return np.float32(b)


def half_to_float32(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 values of float16 ``bits`` (int16), written into ``out``: exact for finite values;
    inf and NaN come out as finite values of magnitude >= 2**16, above every finite float16."""
    o = out.view(np.int32)
    np.copyto(o, bits)  # sign-extends: negative values carry ones in bits 16-31
    np.left_shift(o, 13, out=o)  # exponent to bits 23-27, mantissa to bits 13-22, sign stays in bit 31
    np.bitwise_and(o, _CLEAR, out=o)
    np.multiply(out, _REBIAS, out=out)  # also turns float16 subnormals into the right normal float32
    return out


def _count_rows(flags: np.ndarray) -> np.ndarray:
    """Per-column count of True in a (rows <= 255, cols) bool array, eight columns per uint64 add."""
    d = flags.shape[1]
    if d % 8:
        return np.add.reduce(flags.view(np.uint8), axis=0, dtype=np.uint32)
    lanes = np.add.reduce(flags.view(np.uint8).view(np.uint64), axis=0)  # bytes never carry: rows < 256
    return lanes.view(np.uint8).astype(np.uint32)


_LOCAL = threading.local()


def _scratch(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's tile buffers for ``d`` columns, kept between chunks: fresh multi-MiB buffers per
    chunk cost page faults and, with two threads, TLB shootdowns that showed up as lost scaling."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None or bufs[0].shape[1] != d:
        shape = (TILE_ROWS, d)
        bufs = (np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.bool_),
                np.empty(shape, np.uint16))  # fmt: skip
        _LOCAL.bufs = bufs
    return bufs


def block_stats(block: np.ndarray, bound: float) -> np.ndarray | None:
    """``(6, neurons)`` float64 statistics of a float16/float32 chunk, or None if it holds inf/NaN."""
    if block.dtype not in (np.float16, np.float32):
        return None
    rows, d = block.shape
    if not rows:
        inf = np.full(d, np.inf)
        return np.stack([np.zeros(d), np.zeros(d), np.zeros(d), inf, -inf, np.zeros(d)])
    half = block.dtype == np.float16
    limit = below_bound(bound, block.dtype)
    n_tiles = -(-rows // TILE_ROWS)
    # per-tile results, combined once at the end: min, max, near count, mean guess, residual sum, m2
    lo, hi, mu, res, sq = (np.empty((n_tiles, d), np.float32) for _ in range(5))
    near = np.zeros(d, np.uint32)
    counts = np.empty(n_tiles)
    f, c, flags, mag = _scratch(d)
    limit_bits = np.float16(limit).view(np.uint16) if half else None
    ones = np.ones(TILE_ROWS, np.float32)
    for k, r0 in enumerate(range(0, rows, TILE_ROWS)):
        m = min(TILE_ROWS, rows - r0)
        tile = half_to_float32(block[r0 : r0 + m].view(np.int16), f[:m]) if half else block[r0 : r0 + m]
        t, w = c[:m], ones[:m]
        np.minimum.reduce(tile, axis=0, out=lo[k])
        np.maximum.reduce(tile, axis=0, out=hi[k])
        if half:  # |a| <= bound on the magnitude bits: two int16 passes instead of two float32 ones
            np.bitwise_and(block[r0 : r0 + m].view(np.uint16), np.uint16(0x7FFF), out=mag[:m])
            near += _count_rows(np.less_equal(mag[:m], limit_bits, out=flags[:m]))
        else:
            near += _count_rows(np.less_equal(np.abs(tile, out=t), limit, out=flags[:m]))
        np.divide(w @ tile, np.float32(m), out=mu[k])  # corrected two-pass: center on a guess ...
        np.subtract(tile, mu[k], out=t)
        np.matmul(w, t, out=res[k])  # ... and keep the residual sum that corrects it
        np.einsum("ij,ij->j", t, t, out=sq[k])
        counts[k] = m
    lo_all, hi_all = lo.min(axis=0), hi.max(axis=0)
    if not (np.isfinite(lo_all).all() and np.isfinite(hi_all).all()):
        return None
    if half and max(-lo_all.min(), hi_all.max()) >= 2.0**16:  # inf/NaN bits convert to >= 2**16
        return None
    delta = res.astype(np.float64) / counts[:, None]
    means = mu + delta
    m2s = sq - counts[:, None] * delta * delta
    mean = counts @ means / rows
    m2 = m2s.sum(axis=0) + counts @ (means - mean) ** 2
    return np.stack([np.full(d, float(rows)), mean, m2, lo_all, hi_all, near]).astype(np.float64)
