"""Chunk shapes and compression for cached arrays (the choice is measured: see docs/design/codec.md)."""

from __future__ import annotations

from typing import Any

from zarr.codecs import BloscCodec

# Neuron columns per chunk: wide layers (11008 Llama, 16384 OPT) are cut so that a redundancy block of
# (rows, 2048) neurons reads whole chunks and a chunk stays a few MiB.
NEURON_CHUNK = 2048
DEFAULT_CHUNK_ROWS = 1024


def activation_codec() -> Any:
    """Blosc(lz4, level 5, bitshuffle): see docs/design/codec.md for the measurement behind it."""
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def neuron_chunk(n_neurons: int) -> int:
    return min(n_neurons, NEURON_CHUNK)
