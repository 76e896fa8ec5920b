"""Mixture-of-experts runs through the CLI, SQL and the Python API: per-expert rows beside unchanged dense
rows, and the whole-layer analyses (drift, compare, dead overlap) kept to dense taps. Oracles: numpy on
tests/moe_store.py's arrays."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import qcache
from qcache.analyze.drift import dead_overlap
from qcache.cli import main
from qcache.store.errors import InvalidName
from tests.moe_store import random_layer, write_moe_run

LENGTHS = np.full(12, 10)
N = int(LENGTHS.sum())


def _dense(seed: int, d: int = 32) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((N, d)).astype(np.float32)
    x[:, 0] = 0.01  # dead
    return x


@pytest.fixture
def pair(tmp_path):
    """fp16 and int8 runs of one model: layer 1 dense, layer 2 MoE (no shared expert), layer 3 MoE with a
    shared expert; the int8 run routes differently (its own router)."""
    root = tmp_path / "s"
    layers = {}
    for quant, seed in (("fp16", 10), ("int8", 20)):
        moe = {2: random_layer(seed, N), 3: random_layer(seed + 1, N, shared_d=32)}
        write_moe_run(root, LENGTHS, {1: _dense(seed)}, moe, quant=quant)
        layers[quant] = moe
    return root, layers


def test_analyze_all_keeps_drift_and_overlap_to_dense_taps(pair):
    root, layers = pair
    res = CliRunner().invoke(main, ["analyze", "all", "--store", str(root), "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{") :])
    dead = out["dead"]
    assert {"expert", "n_tokens"} <= set(dead[0])  # per-expert rows shown with their token counts
    lone = [r for r in dead if r["layer"] == 2 and r["expert"] == 5]
    assert [(r["n_tokens"], r["n_dead"]) for r in lone] == [(0, None), (0, None)]
    assert sorted({r["layer"] for r in out["drift"]}) == [1, 3]  # layer 2 has no dense tap
    overlap = dead_overlap(root, log=lambda _: None).to_pylist()
    assert [(r["layer"], r["n_a"], r["n_b"]) for r in overlap] == [(1, 1, 1), (3, 0, 0)]  # no expert neuron
    s = qcache.open(root)
    per_layer = s.sql(
        "SELECT layer, expert, n_tokens FROM dead_neurons WHERE quant = 'int8' AND layer = 2 ORDER BY expert"
    )
    want = np.bincount(layers["int8"][2].ids.ravel(), minlength=6)
    assert per_layer["n_tokens"].tolist() == want.tolist()
    dense = s.sql(
        "SELECT layer, count(*) AS n FROM neuron_stats WHERE expert IS NULL GROUP BY layer ORDER BY 1"
    )
    assert dense.values.tolist() == [[1, 64], [3, 64]]  # 32 neurons x 2 runs, no expert neuron


def test_compare_leaves_out_layers_without_a_dense_tap(pair):
    root, _ = pair
    res = CliRunner().invoke(main, ["compare", "--store", str(root), "--json"])
    assert res.exit_code == 0, res.output
    assert "layers [2] are mixture-of-experts layers without a shared expert" in res.output
    rows = pq.read_table(next((root / "tables" / "method_comparison_layers").glob("*.parquet"))).to_pylist()
    assert [r["layer"] for r in rows] == [1, 3]
    bad = CliRunner().invoke(main, ["compare", "--store", str(root), "--layers", "2"])
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1
    assert "mixture-of-experts layer without a shared expert" in bad.output and "Traceback" not in bad.output


def test_python_api(pair):
    root, layers = pair
    run = qcache.open(root).run("boolq/synth/fp16")
    m = layers["fp16"][2]
    routed = (m.ids == 1).any(axis=1)
    arr = run.dataarray(2, expert=1)
    np.testing.assert_array_equal(arr.values, m.acts[1][routed])
    np.testing.assert_array_equal(arr["example_id"].values, np.repeat(np.arange(12), 10)[routed])
    assert arr.attrs["expert"] == 1 and arr.sizes == {"token": int(routed.sum()), "neuron": 24}
    np.testing.assert_array_equal(run.dataarray(3).values, layers["fp16"][3].shared)  # the shared expert
    with pytest.raises(InvalidName, match=r"pass expert= \(0 to 5\)"):
        run.dataarray(2)
    np.testing.assert_array_equal(run.expert_tokens(2), np.bincount(m.ids.ravel(), minlength=6))
    np.testing.assert_array_equal(run.router(2)[0].compute(), m.ids)
    assert run.moe_layers[2]["top_k"] == 2 and np.isnan(run.expert_activations(2, 5).compute()).all()


def test_tables_written_before_experts_still_query(tmp_path):
    """A dense part without the ``expert`` column (written before it existed) beside a new one."""
    from qcache.analyze.runner import AnalyzeConfig, run_dead

    root = tmp_path / "s"
    write_moe_run(root, LENGTHS, {1: _dense(1)}, {2: random_layer(2, N)}, quant="fp16")
    write_moe_run(root, LENGTHS, {1: _dense(2)}, {2: random_layer(3, N)}, quant="int8")
    run_dead(AnalyzeConfig(store=root), log=lambda _: None)
    old = root / "tables" / "dead_neurons" / "boolq--synth--fp16.parquet"
    pq.write_table(
        pq.read_table(old).drop_columns(["expert"]).filter(pq.read_table(old)["expert"].is_null()), old
    )
    got = qcache.open(root).sql(
        "SELECT quant, layer, n_dead FROM dead_neurons WHERE expert IS NULL ORDER BY quant, layer"
    )
    assert got.values.tolist() == [["fp16", 1, 1], ["int8", 1, 1]]


def _du(path) -> int:
    """Oracle: bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_ls_lists_moe_runs_with_their_expert_and_router_arrays(pair):
    """Issue #15: ``ls`` failed on a layer without a shared expert (no dense array to open)."""
    root, _ = pair
    res = CliRunner().invoke(main, ["ls", "--store", str(root), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    run_dir = root / "runs" / "boolq" / "synth" / "int8"
    got = {(r["layer"], r["array"]): r for r in rows if r["quant"] == "int8"}
    experts = [f"L002/experts/E{e:03d}/activations" for e in range(6)]
    want = {
        (1, "activations"): ([N, 32], "float32", ["L001/activations"]),
        (2, "experts/activations"): ([6, N, 24], "float32", experts),
        (2, "router/topk_ids"): ([N, 2], "int16", ["L002/router/topk_ids"]),
        (2, "router/topk_weights"): ([N, 2], "float32", ["L002/router/topk_weights"]),
        (3, "activations"): ([N, 32], "float32", ["L003/activations"]),
        (3, "experts/activations"): ([6, N, 24], "float32", [e.replace("L002", "L003") for e in experts]),
        (3, "router/topk_ids"): ([N, 2], "int16", ["L003/router/topk_ids"]),
        (3, "router/topk_weights"): ([N, 2], "float32", ["L003/router/topk_weights"]),
    }
    assert set(got) == set(want)
    for k, (shape, dtype, paths) in want.items():
        size = sum(_du(run_dir / "layers" / p) for p in paths)
        assert (got[k]["shape"], got[k]["dtype"], got[k]["size_mb"]) == (shape, dtype, round(size / 2**20, 3))
    assert {r["quant"] for r in rows} == {"fp16", "int8"}
    text = CliRunner().invoke(main, ["ls", "--store", str(root)])
    assert text.exit_code == 0 and "router/topk_weights" in text.output and "error" not in text.output


@pytest.fixture
def all_moe(tmp_path):
    """fp32, int8 and nf4 runs whose every layer (2 and 3) is MoE without a shared expert, as Mixtral's."""
    import zarr

    root = tmp_path / "s"
    for quant, seed in (("fp32", 1), ("int8", 2), ("nf4", 3)):
        moe = {2: random_layer(seed, N), 3: random_layer(seed + 5, N)}
        write_moe_run(root, LENGTHS, {1: _dense(seed)}, moe, quant=quant)
        group = zarr.open_group(str(root / "runs" / "boolq" / "synth" / quant), mode="r+", zarr_format=3)
        group.attrs["manifest"] = {**group.attrs["manifest"], "layers": [2, 3]}  # no dense layer listed
    return root


def test_drift_and_compare_of_runs_without_a_dense_layer_say_so_in_one_line(all_moe):
    """Issue #15: drift raised a bare ValueError (concatenating no layer); compare said it twice, garbled."""
    from qcache.store.errors import RunMismatch

    root = all_moe
    drift = CliRunner().invoke(main, ["analyze", "drift", "--store", str(root)])
    assert drift.exit_code != 0 and "Traceback" not in drift.output, drift.output
    assert not isinstance(drift.exception, ValueError)
    last = drift.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "mixture-of-experts layer without a shared expert" in last
    every = CliRunner().invoke(main, ["analyze", "all", "--store", str(root)])
    assert every.exit_code == 0 and "Traceback" not in every.output, every.output
    s = qcache.open(root)
    with pytest.raises(RunMismatch, match="nothing to compare"):
        qcache.compare(s.run("boolq/synth/fp32"), s.run("boolq/synth/nf4"))
    res = CliRunner().invoke(main, ["compare", "--store", str(root)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    table = next(i for i, ln in enumerate(lines) if ln.startswith("rank "))
    for quant in ("int8", "nf4"):
        said = [i for i, ln in enumerate(lines) if f"synth/{quant}" in ln and "not compared" in ln]
        assert len(said) == 1 and said[0] < table, res.output
    assert "no per-expert the comparison" not in res.output
