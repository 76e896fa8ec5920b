"""Whole-chunk reads that skip zarr's async pipeline for the arrays qcache writes itself.

zarr 3 routes every read through its event loop and a thread hop per codec, which caps a scan at about
0.7 GB/s on two cores however many Dask threads ask. A qcache array is a plain regular grid of
``bytes -> blosc`` chunks on a local disk, so a whole chunk is one file read and one Blosc call into a
fresh buffer (both release the GIL). ``direct_chunks`` checks that an array is exactly that and returns
``None`` otherwise; callers then keep reading through zarr. Unaligned selections always go through zarr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec


class DirectChunks:
    """Array-like over a zarr array whose chunk-aligned reads bypass zarr (``dask.array.from_array``)."""

    def __init__(self, array: zarr.Array, directory: Path) -> None:
        self.array = array
        self.directory = directory
        self.shape: tuple[int, ...] = array.shape
        self.dtype = np.dtype(array.dtype)
        self.ndim = array.ndim
        self.chunks: tuple[int, ...] = array.chunks
        self._fill = array.metadata.fill_value

    def __getitem__(self, key: Any) -> np.ndarray:
        index = self._chunk_index(key)
        if index is None:
            return np.asarray(self.array[key])
        return self.read_chunk(index)

    def read_chunk(self, index: tuple[int, ...]) -> np.ndarray:
        """The chunk at grid position ``index``, cut to the array's extent (a missing chunk is fill)."""
        extent = tuple(
            slice(0, min(c, s - i * c)) for i, c, s in zip(index, self.chunks, self.shape, strict=True)
        )
        out = np.empty(self.chunks, dtype=self.dtype)
        self.read_into(index, out)
        return out[extent]

    def read_into(self, index: tuple[int, ...], out: np.ndarray) -> None:
        """Decompress the chunk at grid position ``index`` into ``out``, a C-contiguous array of the full
        chunk shape (an edge chunk is stored padded, so its tail rows are padding); a missing chunk is fill.

        Writing into a buffer the caller reuses spares a fresh allocation (and its page faults) per chunk.
        """
        path = self.directory / self.array.metadata.encode_chunk_key(index)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            out[...] = self._fill
            return
        numcodecs.blosc.decompress(raw, out)

    def _chunk_index(self, key: Any) -> tuple[int, ...] | None:
        """Grid position of ``key`` when it selects exactly one whole chunk (edge chunks cut), else None."""
        if not isinstance(key, tuple) or len(key) != self.ndim:
            return None
        index = []
        for k, c, s in zip(key, self.chunks, self.shape, strict=True):
            if not isinstance(k, slice) or k.step not in (None, 1):
                return None
            start, stop = k.start or 0, s if k.stop is None else k.stop
            if start % c or stop != min(start + c, s):
                return None
            index.append(start // c)
        return tuple(index)


def direct_chunks(array: zarr.Array, directory: Path) -> DirectChunks | None:
    """A ``DirectChunks`` over ``array`` stored in ``directory``, or None where its layout is not plain."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or type(meta.chunk_grid).__name__ != "RegularChunkGrid":
        return None
    codecs = meta.codecs
    if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        return None
    endian = codecs[0].endian
    if np.dtype(array.dtype).itemsize > 1 and (endian is None or endian.value != sys.byteorder):
        return None
    return DirectChunks(array, directory)
