"""Direct chunk reads against zarr's own reads of the same arrays."""

from __future__ import annotations

import dask
import numpy as np
import zarr

from qcache.store.chunks import direct_chunks
from qcache.store.codecs import activation_codec
from tests.synthetic import write_run


def _array(path, data, chunks, **kw):
    z = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0, **kw)
    z[:] = data
    return z


def test_every_chunk_equals_zarr_including_edges_and_missing(tmp_path):
    data = np.random.default_rng(0).standard_normal((100, 70)).astype(np.float16)
    data[64:, 32:64] = 0  # an all-fill chunk zarr does not write
    z = _array(tmp_path / "a", data, (64, 32), compressors=activation_codec())
    src = direct_chunks(z, tmp_path / "a")
    assert src is not None
    assert not (tmp_path / "a" / "c" / "1" / "1").exists()
    for i in range(2):
        for j in range(3):
            key = (slice(64 * i, min(64 * i + 64, 100)), slice(32 * j, min(32 * j + 32, 70)))
            got = src[key]
            np.testing.assert_array_equal(got, z[key])
            assert got.flags.writeable and got.dtype == np.float16
    np.testing.assert_array_equal(src[5:9, 3:40], data[5:9, 3:40])  # unaligned: through zarr


def test_other_layouts_are_left_to_zarr(tmp_path):
    data = np.ones((64, 64), np.float32)
    assert direct_chunks(_array(tmp_path / "raw", data, (32, 32), compressors=None), tmp_path / "raw") is None
    sharded = _array(tmp_path / "sh", data, (16, 16), shards=(32, 32), compressors=activation_codec())
    assert direct_chunks(sharded, tmp_path / "sh") is None


def test_run_arrays_read_directly_and_agree_with_zarr(tmp_path):
    x = np.random.default_rng(1).standard_normal((700, 96)).astype(np.float16)
    run = write_run(tmp_path / "s", {1: x}, np.full(35, 20))
    lazy = run.activations(1)
    assert lazy.chunks[0][0] == 64 and lazy.name.startswith("qcache-")  # the direct path
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(lazy.compute(), x)
    np.testing.assert_array_equal(lazy.compute(), run.zarr_array(1)[:])
