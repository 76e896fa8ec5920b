"""The Python API (api.py: ``qcache.open``, ``Run.dataarray``, ``qcache.compare``) and the command
``qcache analyze drift``, on a real store from a tiny extraction (tests/tiny_store.py) and on synthetic runs
written by the real writer.

Oracles: the store's Zarr arrays and Parquet parts read directly with zarr and pyarrow, the run's own
manifest JSON, and a per-neuron numpy Pearson/MAD/relative-RMS written here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner

import qcache
from qcache.cli import main
from qcache.store.errors import (
    IncompleteRun,
    InvalidName,
    InvalidOption,
    RunMismatch,
    RunNotFound,
    StoreError,
)
from qcache.store.tables import SQLError
from tests.synthetic import write_run
from tests.tiny_store import LAYERS, LIMIT

RUN = "boolq/tiny-llama/int8"
BASE = "boolq/tiny-llama/fp32"


def _z(store: Path, run: str, path: str) -> np.ndarray:
    """An array of a run, read with plain zarr (no qcache code)."""
    return zarr.open_array(store / "runs" / run / path, mode="r")[:]


def _manifest(store: Path, run: str) -> dict:
    return json.loads((store / "runs" / run / "zarr.json").read_text())["attributes"]["manifest"]


def _numpy_drift(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Per-neuron Pearson r, mean |b - a| and sqrt(mean((b - a)^2) / mean(a^2)) over the finite rows."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    out: dict[str, list[float]] = {"r": [], "mad": [], "rel_rms": []}
    for j in range(a.shape[1]):
        ok = np.isfinite(a[:, j]) & np.isfinite(b[:, j])
        x, y = a[ok, j], b[ok, j]
        out["r"].append(np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else np.nan)
        out["mad"].append(np.mean(np.abs(y - x)))
        out["rel_rms"].append(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))
    return {k: np.asarray(v) for k, v in out.items()}


def _assert_drift(got: pd.DataFrame, store: Path, base: str, other: str, layers: tuple[int, ...]) -> None:
    assert sorted(set(got["layer"])) == sorted(layers)
    for layer in layers:
        path = f"layers/L{layer:03d}/activations"
        want = _numpy_drift(_z(store, base, path), _z(store, other, path))
        rows = got[got["layer"] == layer].sort_values("neuron")
        assert rows["neuron"].tolist() == list(range(len(want["r"])))
        for col in ("r", "mad", "rel_rms"):
            np.testing.assert_allclose(rows[col].to_numpy(), want[col], rtol=1e-7, atol=1e-12, err_msg=col)


def test_import_stays_light() -> None:
    code = "import sys, qcache; assert not {'xarray', 'pandas', 'dask', 'zarr'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_open_lists_runs(tiny_store: Path) -> None:
    s = qcache.open(tiny_store)
    assert [str(k) for k in s.runs()] == [BASE, RUN]
    table = s.runs_table()
    assert table["run"].tolist() == [BASE, RUN]
    n_tokens = len(_z(tiny_store, RUN, "tokens/token_id"))
    assert table["n_tokens"].tolist() == [n_tokens, n_tokens]
    assert table["n_examples"].tolist() == [LIMIT, LIMIT]
    assert table["complete"].tolist() == [True, True]
    assert table["layers"].tolist() == [list(LAYERS)] * 2
    assert table["n_neurons"].tolist() == [_manifest(tiny_store, RUN)["n_neurons"]] * 2
    with pytest.raises(StoreError, match="no store at"):
        qcache.open(tiny_store.parent / "nowhere")


@pytest.mark.parametrize("run_name", [BASE, RUN])
def test_dataarray_is_the_zarr_array_with_the_token_index(tiny_store: Path, run_name: str) -> None:
    run = qcache.open(tiny_store).run(run_name)
    x = run.dataarray(3)
    assert isinstance(x, xr.DataArray) and isinstance(x.data, da.Array)  # lazy
    assert x.dims == ("token", "neuron")
    direct = _z(tiny_store, run_name, "layers/L003/activations")
    assert x.dtype == direct.dtype and x.shape == direct.shape
    np.testing.assert_array_equal(x.values, direct)
    for name in ("example_id", "position", "token_id"):
        np.testing.assert_array_equal(x.coords[name].values, _z(tiny_store, run_name, f"tokens/{name}"))
    np.testing.assert_array_equal(x.neuron.values, np.arange(direct.shape[1]))
    assert (x.attrs["run"], x.attrs["layer"], x.attrs["tap"]) == (run_name, 3, "act")
    # one example by its coordinate: the rows the examples/ arrays say it owns
    start, length = (_z(tiny_store, run_name, f"examples/{n}")[3] for n in ("start", "length"))
    ex3 = x[x.example_id.values == 3]
    np.testing.assert_array_equal(ex3.values, direct[start : start + length])
    np.testing.assert_array_equal(ex3.position.values, np.arange(length))
    np.testing.assert_array_equal(x.sel(neuron=5).values, direct[:, 5])
    np.testing.assert_array_equal(
        run.activations(1).compute(), _z(tiny_store, run_name, "layers/L001/activations")
    )


def test_a_store_at_a_url_reads_the_same(tiny_store: Path) -> None:
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    name = f"/qc-api-{uuid.uuid4().hex[:8]}"
    fs.put(str(tiny_store), name, recursive=True)
    try:
        s = qcache.open(f"memory://{name}")
        assert [str(k) for k in s.runs()] == [BASE, RUN]
        x = s.run(RUN).dataarray(1)
        np.testing.assert_array_equal(x.values, _z(tiny_store, RUN, "layers/L001/activations"))
        np.testing.assert_array_equal(x.token_id.values, _z(tiny_store, RUN, "tokens/token_id"))
        query = "SELECT layer, neuron, r FROM activation_drift ORDER BY ALL"
        pd.testing.assert_frame_equal(s.sql(query), qcache.open(tiny_store).sql(query))
    finally:
        fs.rm(name, recursive=True)


def test_tables_of_a_run(tiny_store: Path) -> None:
    run = qcache.open(tiny_store).run(RUN)
    tokens = run.tokens()
    assert isinstance(tokens, pd.DataFrame)
    for name in ("example_id", "position", "token_id"):
        np.testing.assert_array_equal(tokens[name].to_numpy(), _z(tiny_store, RUN, f"tokens/{name}"))
    ex = run.examples()
    for name in ("gold", "source_row", "start", "length", "n_truncated"):
        np.testing.assert_array_equal(ex[name].to_numpy(), _z(tiny_store, RUN, f"examples/{name}"))
    labels = _manifest(tiny_store, RUN)["dataset"]["labels"]
    assert ex["gold_word"].tolist() == [labels[g] for g in _z(tiny_store, RUN, "examples/gold")]
    assert ex["example_id"].tolist() == list(range(LIMIT))
    parts = sorted((tiny_store / "_qcache" / "runs" / RUN / "_predictions").glob("*.parquet"))
    parts = [t for t in map(pq.read_table, parts) if t.num_rows]  # a unit may own no example
    direct = pa.concat_tables(parts).sort_by("example_id")
    preds = run.predictions(arrow=True)
    assert isinstance(preds, pa.Table) and preds.drop_columns(["pred_word"]).equals(direct)
    assert preds["pred_word"].to_pylist() == [labels[p] for p in direct["pred_label"].to_pylist()]
    frame = run.predictions()
    assert frame["example_id"].tolist() == list(range(LIMIT))
    np.testing.assert_array_equal(frame["confidence"].to_numpy(), direct["confidence"].to_numpy())
    assert run.manifest["quant"] == "int8" and run.layers == list(LAYERS)  # the store Run's attributes


def test_compare_is_a_numpy_pearson_per_neuron(tiny_store: Path) -> None:
    s = qcache.open(tiny_store)
    got = qcache.compare(s.run(BASE), s.run(quant="int8"), 3)
    assert got.columns.tolist() == ["layer", "neuron", "r", "mad", "rel_rms"]
    _assert_drift(got, tiny_store, BASE, RUN, (3,))
    _assert_drift(qcache.compare(s.run(BASE), s.run(RUN)), tiny_store, BASE, RUN, LAYERS)
    with pytest.raises(InvalidName, match="layer 2 is not cached"):
        qcache.compare(s.run(BASE), s.run(RUN), 2)


def test_compare_refuses_runs_on_other_tokens(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lengths = np.array([5, 7, 6, 4])
    for model, n in (("m1", 4), ("m2", 3)):
        acts = {1: rng.normal(size=(int(lengths[:n].sum()), 8)).astype(np.float32)}
        write_run(tmp_path, acts, lengths[:n], model=model, chunk_rows=8)
    write_run(
        tmp_path, {1: np.ones((22, 8), np.float32)}, lengths, model="m1", quant="nf4", chunk_rows=8, units=[0]
    )
    s = qcache.open(tmp_path)
    with pytest.raises(RunMismatch) as err:
        qcache.compare(s.run("boolq/m1/fp16"), s.run("boolq/m2/fp16"), 1)
    msg = str(err.value)
    assert "\n" not in msg and "token counts differ" in msg and "boolq/m2/fp16" in msg
    with pytest.raises(IncompleteRun, match=r"boolq/m1/nf4 is .*% extracted"):
        qcache.compare(s.run("boolq/m1/fp16"), s.run("boolq/m1/nf4"), 1)


def test_dataarray_of_an_unfinished_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    lengths = np.array([5, 9, 3, 8, 6, 7])
    acts = rng.normal(size=(int(lengths.sum()), 8)).astype(np.float32)
    write_run(tmp_path, {1: acts}, lengths, chunk_rows=8, units=[0, 2])
    run = qcache.open(tmp_path).run("boolq/synth/fp16")
    with pytest.raises(IncompleteRun, match="allow_partial=True"):
        run.dataarray(1)
    x = run.dataarray(1, allow_partial=True)
    rows = np.concatenate([np.arange(*run.layout.unit_rows(u)) for u in (0, 2)])
    np.testing.assert_array_equal(x.values, acts[rows])
    example_of_row = np.repeat(np.arange(len(lengths)), lengths)
    np.testing.assert_array_equal(x.example_id.values, example_of_row[rows])


def test_bad_run_names_say_what_exists_in_one_line(tiny_store: Path) -> None:
    s = qcache.open(tiny_store)
    cases = [
        (lambda: s.run("boolqq/tiny-llama/int8"), RunNotFound, "no dataset 'boolqq' (did you mean 'boolq'?)"),
        (
            lambda: s.run("boolq/tiny-lama/nf4"),
            RunNotFound,
            "no model 'tiny-lama' (did you mean 'tiny-llama'?)",
        ),
        (lambda: s.run(quant="fp16"), RunNotFound, "no run matches quant='fp16'"),
        (lambda: s.run(model="tiny-llama"), InvalidOption, "2 runs match model='tiny-llama'"),
        (lambda: s.run("boolq/int8"), InvalidName, "must be DATASET/MODEL/QUANT"),
        (lambda: s.run("boolq/tiny-llama/int4"), RunNotFound, "no quant 'int4' (did you mean 'int8'?)"),
        (lambda: s.run("boolq/tiny-llama/a--b"), InvalidName, "quant 'a--b'"),
        (lambda: s.run(RUN, quant="int8"), InvalidOption, "not both"),
        (lambda: s.run(RUN).dataarray(2), InvalidName, "layer 2 is not cached in boolq/tiny-llama/int8"),
        (lambda: s.run(RUN).dataarray(3, tap="resid"), InvalidName, "'resid' is not cached"),
    ]
    for call, kind, text in cases:
        with pytest.raises(kind) as err:
            call()
        msg = str(err.value)
        assert text in msg and "\n" not in msg, msg
        if kind is RunNotFound:
            assert f"runs here: {BASE}, {RUN}" in msg


def test_sql_returns_a_dataframe(tiny_store: Path) -> None:
    s = qcache.open(tiny_store)
    got = s.sql("SELECT layer, neuron, r FROM activation_drift WHERE quant = 'int8' ORDER BY layer, neuron")
    assert isinstance(got, pd.DataFrame) and got.columns.tolist() == ["layer", "neuron", "r"]
    direct = pq.read_table(tiny_store / "tables/activation_drift/boolq--tiny-llama--int8.parquet").to_pandas()
    direct = direct.sort_values(["layer", "neuron"]).reset_index(drop=True)
    np.testing.assert_array_equal(got["r"].to_numpy(), direct["r"].to_numpy())
    assert got["layer"].dtype == np.int32
    empty = s.sql("SELECT * FROM metrics WHERE value > 1e9", arrow=True)
    assert isinstance(empty, pa.Table) and empty.num_rows == 0 and "metric" in empty.column_names
    assert "activation_drift" in s.tables() and "metrics" in s.tables()
    with pytest.raises(SQLError, match="read-only"):
        s.sql("DROP TABLE metrics")


def test_analyze_all_writes_activation_drift(tiny_store: Path) -> None:
    parts = sorted((tiny_store / "tables/activation_drift").glob("*.parquet"))
    assert [p.name for p in parts] == ["boolq--tiny-llama--int8.parquet"]
    table = pq.read_table(parts[0]).to_pandas()
    assert set(table["baseline"]) == {"fp32"} and set(table["quant"]) == {"int8"}
    _assert_drift(table, tiny_store, BASE, RUN, LAYERS)


def test_analyze_drift_command(tiny_store: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    res = CliRunner().invoke(
        main, ["analyze", "drift", "--store", str(tiny_store), "--results", str(results)]
    )
    assert res.exit_code == 0, res.output
    table = pq.read_table(results / "tables/activation_drift/boolq--tiny-llama--int8.parquet").to_pandas()
    _assert_drift(table, tiny_store, BASE, RUN, LAYERS)
    lines = [ln.split() for ln in res.stdout.splitlines()]
    assert lines[0][:6] == ["dataset", "model", "baseline", "quant", "layer", "n_neurons"]
    for row, layer in zip(lines[1:], LAYERS, strict=True):
        r = _numpy_drift(*(_z(tiny_store, k, f"layers/L{layer:03d}/activations") for k in (BASE, RUN)))["r"]
        assert row[:5] == ["boolq", "tiny-llama", "fp32", "int8", str(layer)]
        assert row[6] == f"{np.median(r):.4f}"
    res = CliRunner().invoke(
        main, ["analyze", "drift", "--store", str(tiny_store), "--results", str(results), "--layers", "3"]
    )
    assert res.exit_code == 0, res.output
    table = pq.read_table(results / "tables/activation_drift/boolq--tiny-llama--int8.parquet").to_pandas()
    _assert_drift(table, tiny_store, BASE, RUN, (3,))
    for args, text in (
        (["--bits", "4"], "no pair to compare: drift needs a baseline run (fp16, else fp32)"),
        (["--layers", "2"], "layer(s) [2] are not cached in both"),
        (["--baseline", "nf4"], "needs a baseline run (nf4)"),
    ):
        res = CliRunner().invoke(
            main, ["analyze", "drift", "--store", str(tiny_store), "--results", str(results), *args]
        )
        err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(err) == 1 and text in err[0], res.output
        assert "Traceback" not in res.output


def test_analyze_drift_allow_partial_uses_rows_done_in_both(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    lengths = np.array([6, 9, 4, 7, 5, 8])
    base = rng.normal(size=(int(lengths.sum()), 8)).astype(np.float32)
    other = base + 0.3 * rng.normal(size=base.shape).astype(np.float32)
    write_run(tmp_path, {1: base}, lengths, quant="fp16", chunk_rows=8)
    run = write_run(tmp_path, {1: other}, lengths, quant="nf4", chunk_rows=8, units=[1, 3])
    args = ["analyze", "drift", "--store", str(tmp_path)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "every pair was skipped" in res.stderr and "% extracted" in res.stderr
    res = CliRunner().invoke(main, [*args, "--allow-partial"])
    assert res.exit_code == 0, res.output
    rows = np.concatenate([np.arange(*run.layout.unit_rows(u)) for u in (1, 3)])
    table = pq.read_table(tmp_path / "tables/activation_drift/boolq--synth--nf4.parquet").to_pandas()
    want = _numpy_drift(base[rows], other[rows])
    for col in ("r", "mad", "rel_rms"):
        np.testing.assert_allclose(table[col].to_numpy(), want[col], rtol=1e-7, err_msg=col)


def test_token_coordinate_and_prompts(tiny_store: Path) -> None:
    from qcache.extract.inputs.datasets import DatasetRequest, load_dataset

    run = qcache.open(tiny_store).run(RUN)
    x = run.dataarray(3)
    strings = np.asarray(run.reader.token_strings())
    assert strings.shape == (x.sizes["token"],)
    np.testing.assert_array_equal(x.coords["token"].values, strings)
    assert run.tokens()["token"].tolist() == strings.tolist()
    prompts = load_dataset(DatasetRequest(name="boolq", limit=LIMIT)).prompts
    assert run.examples()["prompt"].tolist() == list(prompts)
