"""Dead-neuron scan against numpy, on a real store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcache.analyze.dead import DeadRule, neuron_stats
from qcache.analyze.runner import AnalyzeConfig, run_dead
from tests.synthetic import write_run


def _acts(seed: int, n: int = 700, d: int = 96, dtype=np.float16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.01, 2.0, d)
    x[:, 3] = rng.uniform(-0.1, 0.1, n)  # within [-0.1, 0.1]: dead under SiLU/GELU
    x[:, 4] = 0.0  # all zeros: dead under any rule
    x[:, 5] = rng.uniform(-0.1, 0.1, n)
    x[17, 5] = 0.25  # one excursion: alive
    return x.astype(dtype)


@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_stats_and_dead_flags_match_numpy(tmp_path, activation):
    x = _acts(0)
    if activation == "relu":
        x = np.maximum(x, 0)
        x[:, 6] = np.where(np.arange(len(x)) % 2, 1e-7, 0.0).astype(x.dtype)  # tiny but not zero
    run = write_run(tmp_path / "s", {1: x}, np.full(35, 20), activation=activation)
    rule = DeadRule()
    st = neuron_stats(run.activations(1), activation, rule)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(st.minimum, x64.min(0))
    np.testing.assert_allclose(st.maximum, x64.max(0))
    assert (np.abs(st.mean - x64.mean(0)) <= 1e-6 * np.abs(x64).max(0)).all()  # float32 tiles
    np.testing.assert_allclose(st.std, x64.std(0), rtol=1e-6, atol=1e-9)
    bound = 0.0 if activation == "relu" else 0.1
    np.testing.assert_array_equal(st.dead, (np.abs(x64) <= bound).all(0))
    np.testing.assert_allclose(st.frac_near_zero, (np.abs(x64) <= bound).mean(0))
    assert st.dead[4] and not st.dead[5]
    if activation == "relu":
        assert not st.dead[6] and neuron_stats(run.activations(1), "relu", DeadRule(relu_eps=1e-6)).dead[6]
    else:
        assert st.dead[3]


def test_table_4_rows_per_layer(tmp_path):
    run = write_run(tmp_path / "s", {1: _acts(1), 15: _acts(2), 30: _acts(3)}, np.full(35, 20))
    table = run_dead(AnalyzeConfig(store=Path(run.store.root)), log=lambda m: None).to_pylist()
    assert [r["layer"] for r in table] == [1, 15, 30]
    for r, seed in zip(table, (1, 2, 3), strict=True):
        expected = int((np.abs(_acts(seed).astype(np.float64)) <= 0.1).all(0).sum())
        assert r["n_dead"] == expected and r["pct_dead"] == pytest.approx(100 * expected / 96)


def test_partial_runs_are_refused_then_use_only_committed_rows(tmp_path):
    from qcache.store.errors import IncompleteRun

    x = _acts(4)
    run = write_run(tmp_path / "s", {1: x}, np.full(35, 20), units=[0, 2])
    with pytest.raises(IncompleteRun, match="--allow-partial"):
        run_dead(AnalyzeConfig(store=Path(run.store.root)), log=lambda m: None)
    msgs: list[str] = []
    run_dead(AnalyzeConfig(store=Path(run.store.root), allow_partial=True), log=msgs.append)
    assert any("% of tokens extracted so far" in m for m in msgs)
    import pyarrow.parquet as pq

    stats = pq.read_table(next((run.store.root / "tables" / "neuron_stats").glob("*.parquet"))).to_pandas()
    rows = np.r_[0:64, 128:192]
    np.testing.assert_allclose(stats["max"], x[rows].astype(np.float64).max(0))
