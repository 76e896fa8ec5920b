"""Forward batches by length: every example once, in order, at most ``batch_size``, padding bounded."""

from __future__ import annotations

import numpy as np
import pytest

from qcache.extract.run.batching import MAX_PADDING, length_batches


def _padded(lengths: np.ndarray, parts: list[slice]) -> int:
    return sum(len(lengths[p]) * int(lengths[p].max()) for p in parts)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batches_cover_every_example_once_and_bound_padding(seed, batch_size):
    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.lognormal(4, 0.9, size=int(rng.integers(0, 60))).astype(np.int64) + 1)
    parts = length_batches(lengths, batch_size)
    covered = np.concatenate([np.arange(len(lengths))[p] for p in parts]) if parts else np.array([])
    np.testing.assert_array_equal(covered, np.arange(len(lengths)))
    for p in parts:
        rows = lengths[p]
        assert 1 <= len(rows) <= batch_size
        if len(rows) > 1:
            assert len(rows) * rows.max() <= (1 + MAX_PADDING) * rows.sum()


def test_even_lengths_fill_whole_batches_and_uneven_ones_pad_less():
    even = np.sort(np.random.default_rng(0).integers(18, 24, size=46))  # a unit of BoolQ questions
    assert [p.stop - p.start for p in length_batches(even, 16)] == [16, 16, 14]
    # a unit of Jigsaw comments: one batch padded to the longest did 3.9x the real tokens
    uneven = np.array([20, 30, 40, 50, 60, 80, 100, 120, 150, 250, 500])
    naive = len(uneven) * uneven.max()
    assert naive / uneven.sum() > 3.9
    assert _padded(uneven, length_batches(uneven, 16)) <= 1.25 * uneven.sum()
