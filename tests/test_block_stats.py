"""The fast per-chunk statistics kernel against float64 numpy, bit patterns included."""

from __future__ import annotations

import numpy as np
import pytest

from qcache.analyze.block_stats import below_bound, block_stats

ALL_HALF = np.arange(1 << 16, dtype=np.uint16).view(np.int16)


def test_every_finite_float16_pattern_widens_exactly():
    """One row holding every finite float16 value: min and max of a single row are the values."""
    values = ALL_HALF.view(np.float16)
    row = values[np.isfinite(values)][None, :]
    got = block_stats(row, 0.1)
    expected = row[0].astype(np.float64)
    for k in (3, 4):  # min, max: subnormals and both zeros included
        np.testing.assert_array_equal(got[k], expected)
        np.testing.assert_array_equal(np.signbit(got[k]), np.signbit(expected))
    np.testing.assert_array_equal(got[1], expected)  # the mean of one value is the value
    np.testing.assert_array_equal(got[2], 0.0)
    np.testing.assert_array_equal(got[5], np.abs(expected) <= 0.1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bound", [0.0, 1e-6, 0.1, 0.0999755859375, 3.0])
def test_below_bound_decides_like_float64(dtype, bound):
    values = (ALL_HALF.view(np.float16) if dtype == np.float16 else np.linspace(-1, 1, 10001)).astype(dtype)
    values = values[np.isfinite(values)]
    limit = below_bound(bound, np.dtype(dtype))
    np.testing.assert_array_equal(
        np.abs(values).astype(np.float32) <= limit, np.abs(values.astype(np.float64)) <= bound
    )


def _reference(x: np.ndarray, bound: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    n = len(x64)
    mean = x64.mean(0)
    return np.stack(
        [np.full(x.shape[1], n), mean, ((x64 - mean) ** 2).sum(0), x64.min(0), x64.max(0),
         (np.abs(x64) <= bound).sum(0)]
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("rows", [1, 2, 127, 389])  # odd row counts fold the last row in alone
@pytest.mark.parametrize("d", [160, 12])  # packed and plain near-zero counting
def test_block_stats_match_numpy(dtype, rows, d):
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, d)) * rng.uniform(1e-3, 30, d) + rng.normal(0, 5, d)).astype(dtype)
    x[:, 0] = 0.1  # exactly at the bound
    x[:, 1] = -0.0  # negative zero counts as zero
    x[:, 2] = np.float16(3e-7)  # float16 subnormal
    x[:, 3] = np.float16(-65504)  # the most negative float16
    x[:, 4] = 1000.0 + np.arange(rows) % 3 * 0.5  # a large mean over a small spread
    got = block_stats(x, 0.1)
    ref = _reference(x, 0.1)
    for row in (0, 3, 4, 5):  # n, min, max, near: exact
        np.testing.assert_array_equal(got[row], ref[row])
    # float64 sums on exactly shifted values: mean and spread to float64 rounding, not float32's
    scale = np.abs(x.astype(np.float64)).max(0)
    assert (np.abs(got[1] - ref[1]) <= 1e-13 * scale).all()
    assert (np.abs(got[2] - ref[2]) <= 1e-11 * ref[2] + 1e-15 * rows * scale**2).all()


def test_a_chunk_with_inf_or_nan_is_declined():
    x = np.ones((70, 32), np.float16)
    assert block_stats(x, 0.1) is not None
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[69, 5] = bad
        assert block_stats(y, 0.1) is None
        assert block_stats(y.astype(np.float32), 0.1) is None


def test_empty_and_unsupported_blocks():
    empty = block_stats(np.empty((0, 8), np.float16), 0.1)
    assert empty[0].sum() == 0 and np.isinf(empty[3]).all() and np.isinf(empty[4]).all()
    assert block_stats(np.ones((4, 8), np.float64), 0.1) is None


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_moments_survive_a_first_tile_unlike_the_rest(dtype):
    """Rows arrive in token order: a massive first token (BOS) or a drifting mean must not cost precision
    through the shift the sums are centered on."""
    rng = np.random.default_rng(3)
    rows, d = 657, 64
    x = rng.standard_normal((rows, d)) * 0.3
    x[:3] += 900.0  # a few huge activations at the start
    x[128:, : d // 2] += np.linspace(0, 40, rows - 128)[:, None]  # a steady drift
    x = x.astype(dtype)
    got, ref = block_stats(x, 0.1), _reference(x, 0.1)
    scale = np.abs(x.astype(np.float64)).max(0)
    assert (np.abs(got[1] - ref[1]) <= 1e-13 * scale).all()
    assert (np.abs(got[2] - ref[2]) <= 1e-11 * ref[2] + 1e-15 * rows * scale**2).all()
