"""Result tables computed under ``--allow-partial`` and what happens once the run finishes (issue #16), and
analysing a subset of layers without dropping the other layers' rows.

Oracles: token row counts from the example lengths and ``chunk_rows`` written here, per-neuron numpy
Pearson r and dead-neuron counts over the rows used, and the Parquet parts read with pyarrow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner

from qcache.analyze.report import ReportConfig, build_report
from qcache.cli import main
from tests.synthetic import write_run

LENGTHS = np.array([6, 9, 4, 7, 5, 8, 6, 3])  # 48 tokens, units of 8 rows: 6 units
CHUNK = 8
DONE = [0, 1, 3]  # the units committed before the resume: 24 rows


def _rows(units: list[int]) -> np.ndarray:
    return np.concatenate([np.arange(u * CHUNK, min((u + 1) * CHUNK, int(LENGTHS.sum()))) for u in units])


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])])


def _cli(*args: str) -> None:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, res.output


def _store(root: Path) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    rng = np.random.default_rng(3)
    t = int(LENGTHS.sum())
    base = rng.normal(size=(t, 8)).astype(np.float32)
    other = {1: (base + 0.3 * rng.normal(size=base.shape)).astype(np.float32)}
    other[2] = (0.05 * rng.normal(size=base.shape)).astype(np.float32)
    other[2][DONE[-1] * CHUNK + CHUNK :, 0] = 5.0  # neuron 0 of layer 2: dead on the first rows only
    write_run(root, {1: base, 2: base}, LENGTHS, quant="fp16", chunk_rows=CHUNK)
    write_run(root, other, LENGTHS, quant="nf4", chunk_rows=CHUNK, units=DONE)
    return base, other


def _resume(root: Path, other: dict[int, np.ndarray]) -> None:
    rest = [u for u in range(6) if u not in DONE]
    write_run(root, other, LENGTHS, quant="nf4", chunk_rows=CHUNK, units=rest)


def test_partial_drift_and_dead_are_out_of_date_once_the_run_finishes(tmp_path: Path) -> None:
    base, other = _store(tmp_path)
    store = str(tmp_path)
    _cli("analyze", "drift", "--store", store, "--allow-partial")
    _cli("analyze", "dead", "--store", store, "--allow-partial", "--bits", "4", "--scheduler", "sync")
    drift_part = tmp_path / "tables/activation_drift/boolq--synth--nf4.parquet"
    table = pq.read_table(drift_part).to_pandas()
    assert set(table["n_tokens"]) == {len(_rows(DONE))} == {24}
    l1 = table[table["layer"] == 1].sort_values("neuron")
    np.testing.assert_allclose(l1["r"], _pearson(base[_rows(DONE)], other[1][_rows(DONE)]), rtol=1e-7)
    _resume(tmp_path, other)

    path = build_report(ReportConfig(store=tmp_path, out=tmp_path / "r1"), log=lambda _: None)
    page = path.read_text()
    assert "drift boolq/synth fp16 -&gt; nf4 was computed on 24 tokens (--allow-partial)" in page
    assert "have 48 now: it is out of date" in page
    assert "neuron_stats, dead_neurons of boolq/synth/nf4 were computed on part of its tokens" in page

    logs: list[str] = []
    path = build_report(ReportConfig(store=tmp_path, out=tmp_path / "r2", analyze=True), log=logs.append)
    assert any("neuron_stats was computed on part of the run's tokens" in line for line in logs), logs
    page = path.read_text()
    assert "out of date" not in page and "computed on part of its tokens" not in page
    table = pq.read_table(drift_part).to_pandas()
    assert set(table["n_tokens"]) == {48}
    l1 = table[table["layer"] == 1].sort_values("neuron")
    np.testing.assert_allclose(l1["r"], _pearson(base, other[1]), rtol=1e-7)
    dead = pq.read_table(tmp_path / "tables/dead_neurons/boolq--synth--nf4.parquet").to_pandas()
    dead = dead.set_index("layer")
    assert dead.loc[2, "n_tokens"] == 48
    want = int((np.abs(other[2]) <= 0.1).all(axis=0).sum())  # every |a| <= 0.1 (silu: --dead-threshold)
    assert dead.loc[2, "n_dead"] == want


def test_analysing_some_layers_keeps_the_other_layers_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    t = int(LENGTHS.sum())
    acts = {n: (rng.normal(size=(t, 8)) * (0.05 if n == 1 else 1.0)).astype(np.float32) for n in (1, 15)}
    write_run(tmp_path, acts, LENGTHS, quant="fp16", chunk_rows=CHUNK)
    store = str(tmp_path)
    tables = tmp_path / "tables"

    def read(name: str) -> dict:
        frame = pq.read_table(tables / name / "boolq--synth--fp16.parquet").to_pandas()
        return {int(k): v for k, v in frame.groupby("layer")}

    def pairs_above(x: np.ndarray, threshold: float) -> int:
        r = np.abs(np.corrcoef(x, rowvar=False))
        return int((r[np.triu_indices(x.shape[1], 1)] >= threshold).sum())

    for cmd in (("dead",), ("redundancy", "--cross-layer")):
        _cli("analyze", *cmd, "--store", store, "--layers", "1,15", "--scheduler", "sync")
    _cli("analyze", "dead", "--store", store, "--layers", "15", "--scheduler", "sync")
    _cli("analyze", "redundancy", "--store", store, "--layers", "15", "--cross-layer", "--scheduler", "sync")
    for name, rows in (("neuron_stats", 8), ("dead_neurons", 1)):
        got = read(name)
        assert sorted(got) == [1, 15] and all(len(v) == rows for v in got.values()), name
    dead = read("dead_neurons")
    for n in (1, 15):  # oracle: dead iff every |a| <= 0.1 (silu)
        assert dead[n]["n_dead"].item() == int((np.abs(acts[n]) <= 0.1).all(axis=0).sum())
    summary = read("redundancy_summary")
    assert sorted(summary) == [1, 15]
    # layer 1's own row kept; the 1x15 cross pair involved a re-analysed layer, so it went with it
    assert summary[1]["layer_b"].tolist() == [1] and summary[15]["layer_b"].tolist() == [15]
    for n in (1, 15):
        assert summary[n]["pairs_above"].item() == pairs_above(acts[n], 0.8)
    hist = read("redundancy")
    assert sorted(hist) == [1, 15] and hist[1]["pairs"].sum() == hist[15]["pairs"].sum() == 28  # 8*7/2

    # other options: the rows of layer 1, computed with the old threshold, are not kept beside the new ones
    _cli(
        "analyze",
        "dead",
        "--store",
        store,
        "--layers",
        "15",
        "--dead-threshold",
        "0.2",
        "--scheduler",
        "sync",
    )
    got = read("dead_neurons")
    assert sorted(got) == [15] and got[15]["bound"].item() == 0.2
