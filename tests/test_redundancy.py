"""Blockwise Pearson redundancy against numpy.corrcoef, on a real store and a real Dask cluster."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from qcache.analyze.redundancy import EDGES, correlation_counts, per_example_means
from qcache.analyze.runner import AnalyzeConfig, run_redundancy
from tests.synthetic import write_run


def _acts(seed: int, n: int = 900, d: int = 150) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 20))
    x = (
        base @ rng.standard_normal((20, d)) * 0.5 + rng.standard_normal((n, d)) + 3.0
    )  # offset: centering matters
    x[:, 10] = 2 * x[:, 11] - 1  # duplicated neuron: r = 1
    x[:, 12] = -x[:, 13]  # r = -1
    x[:, 20] = 0.0  # constant (dead)
    return x.astype(np.float32)


def _numpy_counts(x: np.ndarray, y: np.ndarray | None = None, threshold: float = 0.8):
    x = x.astype(np.float64)
    keep_x = x.std(0) > 0
    if y is None:
        r = np.corrcoef(x[:, keep_x], rowvar=False)
        vals = np.abs(r[np.triu_indices(r.shape[0], 1)])
        n_const = int((~keep_x).sum())
    else:
        y = y.astype(np.float64)
        keep_y = y.std(0) > 0
        full = np.corrcoef(np.hstack([x[:, keep_x], y[:, keep_y]]), rowvar=False)
        vals = np.abs(full[: keep_x.sum(), keep_x.sum() :]).ravel()
        n_const = int((~keep_x).sum() + (~keep_y).sum())
    vals = np.minimum(vals, 1.0)
    return np.histogram(vals, bins=EDGES)[0], int((vals >= threshold).sum()), n_const, vals


@pytest.mark.parametrize(("block", "chunks"), [(32, (100, 50)), (150, (900, 150)), (64, (128, 150))])
def test_counts_equal_numpy_corrcoef(block, chunks):
    x = _acts(0)
    got = correlation_counts(da.from_array(x, chunks=chunks), block=block, top_k=5)
    bins, above, n_const, vals = _numpy_counts(x)
    np.testing.assert_array_equal(got.bins, bins)
    assert got.above == above and got.n_constant == n_const == 1
    assert got.n_pairs == 149 * 148 // 2 == bins.sum()
    assert got.top[0][0] == pytest.approx(1.0, abs=1e-6) and {got.top[0][1:], got.top[1][1:]} == {
        (10, 11),
        (12, 13),
    }
    np.testing.assert_allclose([t[0] for t in got.top], np.sort(vals)[::-1][:5], atol=1e-5)


def test_float16_and_cross_layer_pairs():
    x, y = _acts(1).astype(np.float16), _acts(2).astype(np.float16)
    got = correlation_counts(da.from_array(x, chunks=(256, 64)), da.from_array(y, chunks=(256, 64)), block=50)
    bins, above, n_const, _ = _numpy_counts(x, y)
    # float16 inputs are widened exactly; only |r| right at a bin edge could move, allow one pair
    assert np.abs(got.bins - bins).sum() <= 2 and abs(got.above - above) <= 1
    assert got.n_constant == n_const and got.n_pairs == 149 * 149


def test_per_example_means():
    x = _acts(3)[:60]
    example = np.repeat(np.arange(12), 5)
    got = per_example_means(da.from_array(x, chunks=(7, 150)), example, 12).compute()
    np.testing.assert_allclose(got, x.reshape(12, 5, -1).mean(1), rtol=1e-6)


def test_store_tables_and_a_real_distributed_cluster(tmp_path):
    """Redundancy and the dead-neuron scan on worker processes that share no memory with the client."""
    distributed = pytest.importorskip("distributed")
    from qcache.analyze.page import load_table
    from qcache.analyze.runner import run_dead

    run = write_run(
        tmp_path / "s", {1: _acts(4).astype(np.float16), 2: _acts(5).astype(np.float16)}, np.full(45, 20)
    )
    root = Path(run.store.root)
    threaded = run_redundancy(AnalyzeConfig(store=root, cross_layer=True, top_pairs=3), log=lambda m: None)
    dead_threaded = run_dead(AnalyzeConfig(store=root), log=lambda m: None)
    stats_threaded = load_table(root, "neuron_stats")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        remote = run_redundancy(
            AnalyzeConfig(store=root, cross_layer=True, top_pairs=3, scheduler=cluster.scheduler_address),
            log=lambda m: None,
        )
        dead_remote = run_dead(
            AnalyzeConfig(store=root, scheduler=cluster.scheduler_address), log=lambda m: None
        )
    assert threaded.to_pylist() == remote.to_pylist()
    assert dead_threaded.to_pylist() == dead_remote.to_pylist()
    assert stats_threaded is not None and stats_threaded.equals(load_table(root, "neuron_stats"))
    rows = {(r["layer"], r["layer_b"]): r for r in threaded.to_pylist()}
    assert set(rows) == {(1, 1), (2, 2), (1, 2)}
    _, above, n_const, _ = _numpy_counts(_acts(4).astype(np.float16).astype(np.float32))
    assert rows[(1, 1)]["pairs_above"] == above and rows[(1, 1)]["n_constant"] == n_const


def test_r_blocks_match_corrcoef_with_a_large_offset_and_near_constant_neurons():
    from qcache.analyze.redundancy import column_moments, correlation_blocks

    x = _acts(6, n=2000, d=70).astype(np.float64)
    x[:, 30] = 1000.0 + 1e-2 * x[:, 31]  # large mean, tiny spread: sum x^2 - n mean^2 would cancel
    x = x.astype(np.float32)
    x64 = x.astype(np.float64)
    mean, norm = column_moments(da.from_array(x, chunks=(300, 70)))
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm, np.sqrt(((x64 - x64.mean(0)) ** 2).sum(0)), rtol=1e-12)
    ref = np.corrcoef(x64, rowvar=False)
    seen = np.zeros(ref.shape, dtype=bool)
    for si, sj, r in correlation_blocks(da.from_array(x, chunks=(300, 70)), block=32, tile_rows=512):
        ok = np.isfinite(ref[si, sj])
        assert np.abs(r[ok] - ref[si, sj][ok]).max() < 1e-5  # float32 products of centered data
        seen[si, sj] = True
    assert seen[np.triu_indices(70)].all()


@pytest.mark.parametrize("order", [(False, True), (True, False)])
def test_token_and_per_example_rows_coexist(tmp_path, order):
    """Running --per-example after the token-level analysis (or before) keeps both units' rows
    (the second run used to replace the first's part), each equal to numpy.corrcoef."""
    from qcache.analyze.page import load_table

    lengths = np.full(30, 10)
    x = _acts(4, n=300, d=24)
    write_run(tmp_path / "s", {1: x}, lengths)
    for per_example in order:
        run_redundancy(AnalyzeConfig(store=tmp_path / "s", per_example=per_example), log=lambda m: None)
    means = x.astype(np.float64).reshape(30, 10, -1).mean(1)
    summ = {r["unit"]: r for r in load_table(tmp_path / "s", "redundancy_summary").to_pylist()}
    hist = load_table(tmp_path / "s", "redundancy").to_pylist()
    assert sorted(summ) == ["example", "token"]
    for unit, data in (("token", x), ("example", means)):
        bins, above, n_const, _ = _numpy_counts(data)
        assert (summ[unit]["pairs_above"], summ[unit]["n_constant"]) == (above, n_const)
        assert summ[unit]["n_pairs"] == bins.sum()
        got = [r["pairs"] for r in sorted(hist, key=lambda r: r["bin_lo"]) if r["unit"] == unit]
        np.testing.assert_array_equal(got, bins)


def test_report_draws_the_token_rows_of_a_run_with_both_units(tmp_path):
    import pyarrow.csv as pacsv

    from qcache.analyze.report import ReportConfig, build_report

    x = _acts(5, n=300, d=24)
    write_run(tmp_path / "s", {1: x}, np.full(30, 10))
    for per_example in (False, True):
        cfg = AnalyzeConfig(store=tmp_path / "s", per_example=per_example, corr_threshold=0.4)
        run_redundancy(cfg, log=lambda m: None)
    build_report(ReportConfig(store=tmp_path / "s", out=tmp_path / "out"), log=lambda m: None)
    shown = pacsv.read_csv(tmp_path / "out/tables/redundancy_pairs_above.csv").to_pylist()
    token = _numpy_counts(x, threshold=0.4)[1]
    example = _numpy_counts(x.astype(np.float64).reshape(30, 10, -1).mean(1), threshold=0.4)[1]
    assert token != example and [r["L1"] for r in shown] == [token]


def test_passes_under_a_small_memory_limit_count_the_same():
    """A budget that holds only part of the D x D accumulators: several passes, each re-reading its
    columns, and the counts still equal numpy.corrcoef's (the limit also shrinks the block)."""
    from qcache.analyze import gram

    x = _acts(7)
    plan = gram.plan(900, 150, 150, ("xx",), block=64, tile_rows=100, row_unit=100, budget=250_000)
    assert len(plan.passes) > 1
    got = correlation_counts(
        da.from_array(x, chunks=(100, 50)), block=64, tile_rows=100, memory_limit=250_000
    )
    bins, above, n_const, _ = _numpy_counts(x)
    np.testing.assert_array_equal(got.bins, bins)
    assert (got.above, got.n_constant, got.n_pairs) == (above, n_const, bins.sum())
