"""Mixture-of-experts runs: the read API and the per-expert dead-neuron and redundancy analyses, against numpy
on each expert's routed, committed rows (oracles from tests/moe_store.py's arrays, not from qcache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from qcache.analyze.runner import AnalyzeConfig, run_dead, run_redundancy
from qcache.store.errors import InvalidName
from tests.moe_store import random_layer, routed_rows, write_moe_run

LENGTHS = np.full(12, 10)  # 120 tokens, 16-row units: 8 units
N = int(LENGTHS.sum())
EDGES = np.linspace(0.0, 1.0, 11)


def _dense(seed: int, d: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, d)).astype(np.float32)


@pytest.fixture
def moe_run(tmp_path):
    """Layer 1 dense, layer 2 MoE without a shared expert, layer 3 MoE with one (32 neurons)."""
    layers = {2: random_layer(2, N), 3: random_layer(3, N, shared_d=32)}
    return write_moe_run(tmp_path / "s", LENGTHS, {1: _dense(1)}, layers), layers


def _silent(_: str) -> None:
    pass


def _dead_oracle(x: np.ndarray, bound: float = 0.1) -> dict[str, np.ndarray]:
    """The paper's rule (eq. 2): dead iff every activation lies in [-bound, bound]; population std."""
    x = x.astype(np.float64)
    near = np.abs(x) <= bound
    return {
        "min": x.min(0),
        "max": x.max(0),
        "mean": x.mean(0),
        "std": x.std(0),
        "dead": near.all(0),
        "frac": near.mean(0),
    }


def _corr_oracle(x: np.ndarray, threshold: float = 0.8) -> tuple[np.ndarray, int, int, int]:
    """``(bins, pairs_above, n_pairs, n_constant)`` of |np.corrcoef| over the non-constant neurons."""
    x = x.astype(np.float64)
    keep = x.std(0) > 0
    r = np.corrcoef(x[:, keep], rowvar=False)
    vals = np.minimum(np.abs(r[np.triu_indices(int(keep.sum()), 1)]), 1.0)
    return np.histogram(vals, EDGES)[0], int((vals >= threshold).sum()), vals.size, int((~keep).sum())


def _part(store_root: Path, table: str, variant: str = "") -> list[dict]:
    path = next((store_root / "tables" / table).glob(f"*{variant}.parquet"))
    return pq.read_table(path).to_pylist()


def test_read_api(moe_run):
    run, layers = moe_run
    m2, m3 = layers[2], layers[3]
    assert set(run.moe_layers) == {2, 3} and run.moe_layers[2]["n_experts"] == 6
    assert not run.moe_layers[2]["shared_expert"] and run.moe_layers[3]["shared_expert"]
    ids, weights = run.router(2)
    np.testing.assert_array_equal(ids.compute(), m2.ids)
    np.testing.assert_array_equal(weights.compute(), m2.weights)
    counts = np.bincount(m2.ids.ravel(), minlength=6)
    np.testing.assert_array_equal(run.expert_tokens(2), counts)
    assert counts[4] == 1 and counts[5] == 0
    for e in range(6):
        x = run.expert_activations(2, e).compute()
        routed = (m2.ids == e).any(axis=1)
        np.testing.assert_array_equal(np.isnan(x).all(axis=1), ~routed)
        np.testing.assert_array_equal(x[routed], m2.acts[e][routed])
        np.testing.assert_array_equal(run.routed_rows(2, e), routed)
    np.testing.assert_array_equal(run.activations(3).compute(), m3.shared)  # the shared expert
    with pytest.raises(InvalidName, match="mixture-of-experts layer without a shared expert"):
        run.activations(2)
    with pytest.raises(InvalidName, match="not a mixture-of-experts layer"):
        run.expert_activations(1, 0)
    with pytest.raises(InvalidName, match=r"expert 6 is not an expert of layer 2.*\[0, 6\)"):
        run.expert_activations(2, 6)
    with pytest.raises(InvalidName, match="'down-in' is not stored for the experts"):
        run.expert_activations(2, 0, "down-in")
    with pytest.raises(InvalidName, match="not a mixture-of-experts layer"):
        run.router(1)


def test_dead_per_expert_on_routed_rows(moe_run):
    run, layers = moe_run
    summary = run_dead(AnalyzeConfig(store=run.store.root), log=_silent).to_pylist()
    root = Path(run.store.root)
    stats = _part(root, "neuron_stats")
    dense = [r for r in summary if r["expert"] is None]
    assert [(r["layer"], r["n_tokens"], r["n_neurons"]) for r in dense] == [(1, N, 32), (3, N, 32)]
    every = np.ones(N, bool)
    for layer, m in layers.items():
        counts = np.bincount(m.ids.ravel(), minlength=6)
        rows = [r for r in summary if r["layer"] == layer and r["expert"] is not None]
        assert [r["expert"] for r in rows] == list(range(6))
        assert [r["n_tokens"] for r in rows] == counts.tolist()
        for e, r in enumerate(rows):
            got = [s for s in stats if s["layer"] == layer and s["expert"] == e]
            assert [s["neuron"] for s in got] == list(range(24))
            if counts[e] == 0:  # saw nothing: a row saying so, no figure
                assert r["n_dead"] is None and np.isnan(r["pct_dead"])
                assert all(s["dead"] is None and np.isnan(s["max"]) for s in got)
                continue
            want = _dead_oracle(m.acts[e][routed_rows(m, e, every)])
            assert r["n_dead"] == int(want["dead"].sum())
            assert r["pct_dead"] == pytest.approx(100 * want["dead"].mean())
            np.testing.assert_array_equal([s["dead"] for s in got], want["dead"])
            np.testing.assert_allclose([s["min"] for s in got], want["min"])
            np.testing.assert_allclose([s["max"] for s in got], want["max"])
            np.testing.assert_allclose([s["mean"] for s in got], want["mean"], rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose([s["std"] for s in got], want["std"], rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose([s["frac_near_zero"] for s in got], want["frac"])
            assert want["dead"][0] and want["dead"][1]  # neuron 1 is 7.0 on the rows not routed
    assert all(s["expert"] is None for s in stats if s["layer"] == 1)


def test_redundancy_per_expert_equals_corrcoef(moe_run):
    run, layers = moe_run
    run_redundancy(AnalyzeConfig(store=run.store.root, top_pairs=3), log=_silent)
    root = Path(run.store.root)
    summ, hist = _part(root, "redundancy_summary"), _part(root, "redundancy")
    tops = _part(root, "redundancy_top_pairs")
    every = np.ones(N, bool)
    for layer, m in layers.items():
        counts = np.bincount(m.ids.ravel(), minlength=6)
        for e in range(6):
            (row,) = [r for r in summ if r["layer"] == layer and r["expert"] == e]
            assert row["n_tokens"] == counts[e] and row["n_neurons"] == 24
            bins = [r["pairs"] for r in hist if r["layer"] == layer and r["expert"] == e]
            if counts[e] < 2:  # 0 or 1 token: no correlation, a row saying so
                assert row["n_pairs"] is None and row["pairs_above"] is None and np.isnan(row["pct_above"])
                assert bins == []
                continue
            want_bins, above, n_pairs, n_const = _corr_oracle(m.acts[e][routed_rows(m, e, every)])
            assert bins == want_bins.tolist()
            assert (row["pairs_above"], row["n_pairs"], row["n_constant"]) == (above, n_pairs, n_const)
            best = [t for t in tops if t["layer"] == layer and t["expert"] == e and t["rank"] == 1]
            assert (best[0]["neuron_a"], best[0]["neuron_b"]) == (2, 3)
    dense = [r for r in summ if r["expert"] is None]
    assert [(r["layer"], r["n_tokens"]) for r in dense] == [(1, N), (3, N)]
    want_bins, above, _, _ = _corr_oracle(layers[3].shared)
    assert [r["pairs"] for r in hist if r["layer"] == 3 and r["expert"] is None] == want_bins.tolist()


def test_partial_run_uses_committed_routed_rows_only(tmp_path):
    """Units 1 and 5 are written but not committed (their rows carry routes and values): left out."""
    m = random_layer(7, N)
    m.ids[20, -1] = 4  # expert 4's single token moves to unit 1, which is not committed
    committed_units = [0, 2, 3, 4, 6, 7]
    run = write_moe_run(tmp_path / "s", LENGTHS, {1: _dense(1)}, {2: m}, units=committed_units, leaked=(1, 5))
    committed = np.zeros(N, bool)
    for u in committed_units:
        committed[u * 16 : (u + 1) * 16] = True
    counts = np.array([routed_rows(m, e, committed).sum() for e in range(6)])
    np.testing.assert_array_equal(run.expert_tokens(2), counts)
    cfg = AnalyzeConfig(store=run.store.root, allow_partial=True, layers=(2,))
    summary = run_dead(cfg, log=_silent).to_pylist()
    run_redundancy(cfg, log=_silent)
    summ = _part(Path(run.store.root), "redundancy_summary")
    for e in range(6):
        (dead_row,) = [r for r in summary if r["expert"] == e]
        (corr_row,) = [r for r in summ if r["expert"] == e]
        assert dead_row["n_tokens"] == corr_row["n_tokens"] == counts[e]
        x = m.acts[e][routed_rows(m, e, committed)]
        if counts[e] >= 1:
            assert dead_row["n_dead"] == int(_dead_oracle(x)["dead"].sum())
        if counts[e] >= 2:
            assert corr_row["pairs_above"] == _corr_oracle(x)[1]
    assert counts[4] == 1  # expert 4 kept its token at row 60 (unit 3); row 20 is uncommitted


def test_per_example_means_over_routed_tokens(moe_run):
    run, layers = moe_run
    run_redundancy(AnalyzeConfig(store=run.store.root, per_example=True, layers=(2,)), log=_silent)
    summ = _part(Path(run.store.root), "redundancy_summary", "per-example")
    m = layers[2]
    example = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
    for e in range(4):
        rows = (m.ids == e).any(axis=1)
        present = np.unique(example[rows])
        means = np.stack([m.acts[e][rows & (example == k)].astype(np.float64).mean(0) for k in present])
        _, above, n_pairs, n_const = _corr_oracle(means)
        (row,) = [r for r in summ if r["expert"] == e]
        assert (row["unit"], row["pairs_above"], row["n_pairs"], row["n_constant"]) == (
            "example",
            above,
            n_pairs,
            n_const,
        )
    (lone,) = [r for r in summ if r["expert"] == 4]  # one token: one example, no correlation
    assert lone["n_pairs"] is None and lone["n_tokens"] == 1
