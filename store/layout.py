"""The token axis: every cached token gets a row before the first forward pass.

Examples are packed back to back, so row ``starts[e] + p`` holds position ``p`` of example ``e``. The axis is
cut into *units* of ``chunk_rows`` rows, exactly the zarr chunk rows: a unit is the grain of work, of
progress and of sharding. Two units never share a zarr chunk, so processes filling different units never
race on a chunk. An example that straddles a unit boundary is run in both units (each writes only its own
rows); its prediction belongs to the unit holding its last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import InvalidOption


@dataclass(frozen=True)
class TokenLayout:
    """Row ranges of examples on the token axis, and their grouping into units."""

    lengths: np.ndarray  # (examples,) real tokens per example after truncation
    chunk_rows: int

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise InvalidOption(f"chunk rows must be positive, got {self.chunk_rows}")
        if len(self.lengths) and int(np.min(self.lengths)) < 1:
            raise InvalidOption("every example needs at least one token")

    @cached_property
    def starts(self) -> np.ndarray:  # (examples,) first row of each example
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)[:-1]]).astype(np.int64)

    @property
    def n_examples(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        return int(np.sum(self.lengths, dtype=np.int64))

    @property
    def n_units(self) -> int:
        return -(-self.n_tokens // self.chunk_rows)

    def unit_rows(self, unit: int) -> tuple[int, int]:
        """Half-open row range ``[r0, r1)`` of ``unit``."""
        r0 = unit * self.chunk_rows
        return r0, min(r0 + self.chunk_rows, self.n_tokens)

    def unit_examples(self, unit: int) -> np.ndarray:
        """Indices of the examples with at least one row in ``unit``."""
        r0, r1 = self.unit_rows(unit)
        ends = self.starts + self.lengths
        lo = int(np.searchsorted(ends, r0, side="right"))
        hi = int(np.searchsorted(self.starts, r1, side="left"))
        return np.arange(lo, hi)

    @cached_property
    def owner_units(self) -> np.ndarray:  # (examples,) unit that writes each example's prediction
        last_rows = self.starts + self.lengths - 1
        return (last_rows // self.chunk_rows).astype(np.int64)

    def shard_units(self, shard: int, n_shards: int) -> list[int]:
        """Units belonging to shard ``shard`` of ``n_shards`` (round robin, so shards stay balanced)."""
        if n_shards < 1 or not 0 <= shard < n_shards:
            raise InvalidOption(f"shard {shard}/{n_shards} is invalid: use i/n with 0 <= i < n")
        return list(range(shard, self.n_units, n_shards))

    def token_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(example_id, position)`` for every row, each ``(tokens,)`` int32."""
        example = np.repeat(np.arange(self.n_examples, dtype=np.int32), self.lengths)
        position = np.arange(self.n_tokens, dtype=np.int64) - np.repeat(self.starts, self.lengths)
        return example, position.astype(np.int32)
