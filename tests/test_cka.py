"""Linear CKA, out of core, against the formulas written out here with numpy (never qcache's own code).

Oracles: Kornblith et al. (2019) eq. (5) on column-centred data; the debiased variant through the N x N
Gram matrices and Song et al. (2012)'s unbiased HSIC estimator as Nguyen et al. (2021) use it, on the raw
(uncentred) data.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from qcache.analyze.cka import linear_cka, run_cka, self_terms
from qcache.cli import main
from qcache.store import open_store
from qcache.store.errors import DataError, InvalidOption
from tests.commands import extract_args
from tests.synthetic import write_run


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64) - x.astype(np.float64).mean(0)
    y = y.astype(np.float64) - y.astype(np.float64).mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def unbiased_hsic(gk: np.ndarray, gl: np.ndarray) -> float:
    """Song et al. (2012), eq. (5), on N x N kernels K and L with their diagonals zeroed."""
    n = gk.shape[0]
    k, m = gk.copy(), gl.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(m, 0.0)
    one = np.ones(n)
    return (
        np.trace(k @ m)
        + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ k @ m @ one)
    ) / (n * (n - 3))


def numpy_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    k, m = x @ x.T, y @ y.T
    return unbiased_hsic(k, m) / np.sqrt(unbiased_hsic(k, k) * unbiased_hsic(m, m))


def _pair(seed: int, n: int = 700, dx: int = 90, dy: int = 70) -> tuple[np.ndarray, np.ndarray]:
    """Two related representations with offsets (centring matters) and one constant column."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dx)) * rng.uniform(0.1, 3, dx) + rng.normal(0, 5, dx)
    y = np.tanh(x @ rng.standard_normal((dx, dy)) / 5) + 0.3 * rng.standard_normal((n, dy)) + 2.0
    x[:, 7] = 4.25
    return x, y


@pytest.mark.parametrize(
    ("chunks", "block", "tile_rows"), [((64, 16), 32, 128), ((700, 90), 2048, 8192), ((100, 90), 40, 300)]
)
def test_equal_to_numpy_on_random_data(chunks, block, tile_rows):
    x, y = _pair(0)
    got = linear_cka(
        da.from_array(x, chunks=chunks),
        da.from_array(y, chunks=(*chunks[:1], 70)),
        precision="float64",
        block=block,
        tile_rows=tile_rows,
    )
    assert got.cka == pytest.approx(numpy_cka(x, y), abs=1e-10, rel=1e-10)
    assert got.cka_debiased is None


def test_float32_products_and_float16_inputs():
    x, y = _pair(1)
    x16, y16 = x.astype(np.float16), y.astype(np.float16)
    got = linear_cka(da.from_array(x16, chunks=(100, 64)), da.from_array(y16, chunks=(100, 64)), block=32)
    # float16 values are widened exactly: the reference is numpy on the same float16 numbers
    assert got.cka == pytest.approx(numpy_cka(x16, y16), abs=1e-6)
    exact = linear_cka(da.from_array(x16, chunks=(100, 64)), da.from_array(y16), precision="float64")
    assert exact.cka == pytest.approx(numpy_cka(x16, y16), abs=1e-10, rel=1e-10)


def test_debiased_equals_the_unbiased_hsic_formula():
    x, y = _pair(2, n=240, dx=30, dy=25)
    got = linear_cka(
        da.from_array(x, chunks=(50, 16)),
        da.from_array(y, chunks=(50, 25)),
        precision="float64",
        debiased=True,
    )
    ref = numpy_debiased_cka(x, y)
    assert got.cka_debiased == pytest.approx(ref, abs=1e-10, rel=1e-10)
    assert got.cka == pytest.approx(numpy_cka(x, y), abs=1e-10)
    assert abs(got.cka_debiased - got.cka) > 1e-3  # the two estimators differ at this size
    f32 = linear_cka(da.from_array(x, chunks=(50, 16)), da.from_array(y), debiased=True)
    assert f32.cka_debiased == pytest.approx(ref, abs=1e-5)


def test_identical_inputs_give_one():
    x, _ = _pair(3, n=300)
    a = da.from_array(x, chunks=(64, 32))
    for precision in ("float32", "float64"):
        got = linear_cka(a, a, precision=precision, debiased=True, block=32)
        assert got.cka == pytest.approx(1.0, abs=1e-12)
        assert got.cka_debiased == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(8, 60),
    dx=st.integers(1, 12),
    dy=st.integers(1, 12),
    scale=st.floats(1e-3, 1e3),
)
def test_invariant_to_rotation_and_isotropic_scaling(seed, n, dx, dy, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dx)) + rng.normal(0, 3, dx)
    y = x[:, :1] @ rng.standard_normal((1, dy)) + rng.standard_normal((n, dy))
    q, _ = np.linalg.qr(rng.standard_normal((dx, dx)))  # a random orthogonal matrix
    base = linear_cka(da.from_array(x), da.from_array(y), precision="float64", debiased=True, block=5)
    assert base.cka == pytest.approx(numpy_cka(x, y), abs=1e-10)
    for moved in (x @ q, scale * x):
        got = linear_cka(da.from_array(moved), da.from_array(y), precision="float64", debiased=True, block=5)
        assert got.cka == pytest.approx(base.cka, abs=1e-9)
        assert got.cka_debiased == pytest.approx(base.cka_debiased, abs=1e-9)


def test_reused_baseline_terms_give_the_same_value():
    x, y = _pair(4, n=400)
    a, b = da.from_array(x, chunks=(64, 90)), da.from_array(y, chunks=(64, 70))
    terms = self_terms(a, precision="float64", debiased=True)
    full = linear_cka(a, b, precision="float64", debiased=True)
    reused = linear_cka(a, b, precision="float64", debiased=True, x_terms=terms)
    assert reused.cka == pytest.approx(full.cka, abs=1e-13)
    assert reused.cka_debiased == pytest.approx(full.cka_debiased, abs=1e-13)
    with pytest.raises(InvalidOption, match="recompute"):
        linear_cka(a, b, precision="float32", x_terms=terms)


def test_rows_must_align(tmp_path: Path):
    x, y = _pair(5, n=200)
    with pytest.raises(DataError, match="same tokens"):
        linear_cka(da.from_array(x), da.from_array(y[:150]))
    lengths = np.full(20, 10)
    write_run(tmp_path / "s", {1: x.astype(np.float16)}, lengths, quant="fp16")
    write_run(tmp_path / "s", {1: x[:190].astype(np.float16)}, lengths[:19], quant="nf4")
    s = open_store(tmp_path / "s")
    with pytest.raises(DataError, match="token counts differ"):
        run_cka(s.run("boolq/synth/fp16"), s.run("boolq/synth/nf4"), 1)


def test_memory_limit_cuts_passes_and_still_agrees():
    from qcache.analyze import gram

    x, y = _pair(6, n=500, dx=120, dy=100)
    a, b = da.from_array(x, chunks=(100, 120)), da.from_array(y, chunks=(100, 100))
    limit = 600_000
    plan = gram.plan(
        500,
        120,
        100,
        ("xy", "xx", "yy"),
        block=64,
        tile_rows=100,
        row_unit=100,
        budget=limit,
        precision="float64",
        stored_itemsize=8,
    )
    assert len(plan.passes) > 1  # the accumulators do not fit at once: several passes over the rows
    small = linear_cka(a, b, precision="float64", memory_limit=limit, block=64, tile_rows=100)
    assert small.cka == pytest.approx(numpy_cka(x, y), abs=1e-10)
    with pytest.raises(InvalidOption, match="too small"):
        linear_cka(a, b, memory_limit=1000)


def test_real_activations_of_a_tiny_extracted_store(tmp_path: Path, tiny_models: dict[str, Path]):
    """fp32 and fp16 extractions of a tiny Llama (real forward passes): CKA per layer equal to numpy's."""
    store = tmp_path / "s"
    for bits in (32, 16):
        res = CliRunner().invoke(main, extract_args(tiny_models["llama"], store, bits=bits, limit=6))
        assert res.exit_code == 0, res.output
    s = open_store(store)
    base, half = s.run(f"boolq/{s.runs()[0].model}/fp32"), s.run(f"boolq/{s.runs()[0].model}/fp16")
    for layer in base.layers:
        x = np.asarray(base.zarr_array(layer)[:])  # read by zarr itself, not by qcache's reader
        y = np.asarray(half.zarr_array(layer)[:])
        got = run_cka(base, half, layer, precision="float64", debiased=True)
        assert got.cka == pytest.approx(numpy_cka(x, y), abs=1e-10, rel=1e-10)
        assert got.cka_debiased == pytest.approx(numpy_debiased_cka(x, y), abs=1e-10, rel=1e-10)
        assert 0.9 < got.cka <= 1.0 + 1e-12
        f32 = run_cka(base, half, layer)
        assert f32.cka == pytest.approx(got.cka, abs=1e-6)
    a, b = base.layers[0], base.layers[-1]
    across = linear_cka(base.activations(a), base.activations(b), precision="float64")
    xa, xb = np.asarray(base.zarr_array(a)[:]), np.asarray(base.zarr_array(b)[:])
    assert across.cka == pytest.approx(numpy_cka(xa, xb), abs=1e-10, rel=1e-10)
