"""The token axis: every row belongs to exactly one example and one unit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qcache.store.layout import TokenLayout

lengths_st = st.lists(st.integers(1, 40), min_size=1, max_size=60).map(np.array)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, chunk_rows=st.integers(1, 64))
def test_units_cover_every_row_once_and_own_every_example_once(lengths, chunk_rows):
    layout = TokenLayout(lengths=lengths, chunk_rows=chunk_rows)
    example, position = layout.token_index()
    assert len(example) == layout.n_tokens == lengths.sum()
    for e in range(len(lengths)):  # rows of example e are contiguous, positions 0..n-1
        rows = np.flatnonzero(example == e)
        assert rows[0] == layout.starts[e] and len(rows) == lengths[e]
        assert position[rows].tolist() == list(range(lengths[e]))
    covered = np.zeros(layout.n_tokens, int)
    for u in range(layout.n_units):
        r0, r1 = layout.unit_rows(u)
        covered[r0:r1] += 1
        # unit_examples is exactly the set of examples with a row in [r0, r1)
        assert set(layout.unit_examples(u).tolist()) == set(example[r0:r1].tolist())
        assert r0 % chunk_rows == 0
    assert (covered == 1).all()
    owners = layout.owner_units
    for e in range(len(lengths)):
        last = layout.starts[e] + lengths[e] - 1
        assert layout.unit_rows(owners[e])[0] <= last < layout.unit_rows(owners[e])[1]


@given(lengths=lengths_st, chunk_rows=st.integers(1, 16), n=st.integers(1, 5))
def test_shards_partition_the_units(lengths, chunk_rows, n):
    layout = TokenLayout(lengths=lengths, chunk_rows=chunk_rows)
    shards = [layout.shard_units(i, n) for i in range(n)]
    flat = sorted(u for s in shards for u in s)
    assert flat == list(range(layout.n_units))
