"""A store written by the release before schema 2 (tests/data/store-v1, see store-v1.md) opens, analyzes to
the same tables, resumes, takes new runs, and migrates to schema 2 without losing a byte of data.

Oracles: the fixture's own files read with numcodecs, pyarrow and json (its chunks, its predictions parts,
the tables that release's ``analyze all`` wrote), never qcache's reader.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numcodecs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from qcache.store import ArraySpec, RunSpec, RunWriter
from qcache.store.errors import NotStored
from qcache.store.tables import run_sql
from tests.files import tree_digest

FIXTURE = Path(__file__).parent / "data" / "store-v1"
RUNS = ("boolq/llama/fp16", "boolq/llama/fp32")
TABLES = sorted(p.relative_to(FIXTURE / "tables").as_posix() for p in (FIXTURE / "tables").rglob("*.parquet"))


@pytest.fixture
def old(tmp_path) -> Path:
    path = tmp_path / "store-v1"
    shutil.copytree(FIXTURE, path)
    return path


def _raw_activations(run_dir: Path) -> np.ndarray:
    """Layer 2's activations decoded chunk by chunk with numcodecs, from the array's zarr.json alone."""
    meta = json.loads((run_dir / "layers/L002/activations/zarr.json").read_text())
    rows, cols = meta["chunk_grid"]["configuration"]["chunk_shape"]
    dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    n = meta["shape"][0]
    blocks = []
    for r in range(-(-n // rows)):
        raw = (run_dir / f"layers/L002/activations/c/{r}/0").read_bytes()
        blocks.append(np.frombuffer(numcodecs.Blosc().decode(raw), dtype=dtype).reshape(rows, cols))
    return np.concatenate(blocks)[:n]


def _same_tables(new_root: Path) -> None:
    """Every table part the old release wrote, rewritten now: the same rows; new columns only added."""
    for name in TABLES:
        before = pq.read_table(FIXTURE / "tables" / name).to_pandas()
        after = pq.read_table(new_root / "tables" / name).to_pandas()
        # columns added since: pred_word; expert (MoE rows); n_tokens (activation_drift's rows);
        # tap (the tap analysed: act for every row here)
        assert set(after.columns) - set(before.columns) <= {"pred_word", "expert", "n_tokens", "tap"}, name
        if "tap" in after.columns:
            assert set(after["tap"]) == {"act"}, name
        if "pred_word" in after.columns:
            words = np.array(["False", "True"])[after["pred_label"].to_numpy()]
            assert list(after["pred_word"]) == list(words)
        after = after[list(before.columns)]
        assert before.shape == after.shape, name
        for col in before.columns:
            a, b = before[col].to_numpy(), after[col].to_numpy()
            if a.dtype.kind == "f":
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9, err_msg=f"{name}:{col}")
            elif a.dtype == object and len(a) and isinstance(a[0], np.ndarray):
                assert all(np.allclose(x, y) for x, y in zip(a, b, strict=True)), f"{name}:{col}"
            else:
                assert list(a) == list(b), f"{name}:{col}"


def test_old_store_reads_as_it_did_and_is_left_untouched(old):
    digest = tree_digest(old)
    s = store.open(old)
    assert [str(k) for k in s.runs()] == list(RUNS)
    for key in RUNS:
        run = s.run(key)
        assert run.files == run.dir  # schema 1: its bookkeeping in its group, read there
        assert run.complete and run.manifest["schema"] == 1
        np.testing.assert_array_equal(run.activations(2).compute(), _raw_activations(old / "runs" / key))
        parts = sorted((old / "runs" / key / "_predictions").glob("*.parquet"))
        stored = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("example_id")
        got = run.predictions()
        assert got.drop_columns(["pred_word"]).equals(stored)
        assert got["pred_word"].to_pylist() == [run.label_words[i] for i in stored["pred_label"].to_pylist()]
        with pytest.raises(NotStored):
            run.token_strings()
        assert run.examples()["prompt"].null_count == 3 and not run.has_token_strings
    _, rows = run_sql(
        s.results, "SELECT run, count(*), count(token) FROM tokens GROUP BY run ORDER BY run", store=s
    )
    assert rows == [(k, 145, 0) for k in RUNS]
    _, rows = run_sql(s.results, "SELECT run, schema, complete FROM runs ORDER BY run", store=s)
    assert rows == [(k, 1, True) for k in RUNS]
    assert CliRunner().invoke(main, ["verify", "--store", str(old)]).exit_code == 0
    assert tree_digest(old) == digest  # reading wrote nothing


def test_old_store_analyzes_to_the_same_tables(old, tmp_path):
    result = CliRunner().invoke(
        main, ["analyze", "all", "--store", str(old), "--results", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    _same_tables(tmp_path / "r")


def test_migrate_moves_bookkeeping_names_dimensions_and_keeps_every_byte_of_data(old, tmp_path):
    chunks = {p: p.read_bytes() for p in (old / "runs").rglob("c/*") if p.is_file()}
    chunks |= {p: p.read_bytes() for p in (old / "runs").rglob("c/*/*") if p.is_file()}
    result = CliRunner().invoke(main, ["migrate", "--store", str(old)])
    assert result.exit_code == 0, result.output
    assert "2 run(s) moved" in result.output
    assert {p: p.read_bytes() for p in chunks} == chunks  # no array data rewritten
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        members = dict(zarr.open_group(str(old), mode="r").members(max_depth=None))
    assert not caught, [str(w.message) for w in caught]
    arrays = {k: a for k, a in members.items() if isinstance(a, zarr.Array)}
    assert len([k for k in arrays if k.startswith("runs/")]) == 2 * 9
    for k, a in arrays.items():
        assert a.metadata.dimension_names is not None and len(a.metadata.dimension_names) == a.ndim, k
    assert arrays["runs/boolq/llama/fp16/layers/L002/activations"].metadata.dimension_names == (
        "token",
        "neuron",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(str(old), engine="zarr", consolidated=False)
    node = tree["runs/boolq/llama/fp32"]
    acts = node["layers/L002/activations"].assign_coords(node["tokens"].coords)
    np.testing.assert_array_equal(acts.values, _raw_activations(old / "runs/boolq/llama/fp32"))
    assert set(acts.coords) == {"example_id", "position", "token_id"}
    s = store.open(old)
    assert json.loads((old / "zarr.json").read_text())["attributes"]["qcache"]["schema"] == 2
    for key in RUNS:
        run = s.run(key)
        assert run.files == old / "_qcache/runs" / key and run.complete
        assert not [p.name for p in run.dir.iterdir() if p.name.startswith(("_", "."))]
    assert not (old / "runs/.create.lock").exists() and not (old / "runs/.locks").exists()
    result = CliRunner().invoke(
        main, ["analyze", "all", "--store", str(old), "--results", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    _same_tables(tmp_path / "r")
    assert CliRunner().invoke(main, ["verify", "--store", str(old)]).exit_code == 0
    digest = tree_digest(old)
    again = CliRunner().invoke(main, ["migrate", "--store", str(old)])
    assert again.exit_code == 0 and "0 run(s) moved" in again.output
    assert tree_digest(old) == digest


def test_a_migration_killed_at_its_switch_loses_nothing_and_finishes_when_rerun(old, monkeypatch):
    from qcache.store import migrate

    real_unlink = Path.unlink

    def crash_at_switch(self, *args, **kwargs):
        if self.name == "_created" and "runs/boolq/llama/fp16" in str(self) and "_qcache" not in str(self):
            raise KeyboardInterrupt("killed")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", crash_at_switch)
    with pytest.raises(KeyboardInterrupt):
        migrate.migrate_store(store.open(old), log=lambda m: None)
    monkeypatch.undo()
    s = store.open(old)
    assert [str(k) for k in s.runs()] == list(RUNS)  # the copy made so far is not a second run
    run = s.run("boolq/llama/fp16")
    assert run.files == run.dir and run.complete  # the old place still counts, whole
    assert run.predictions().num_rows == 3
    report = migrate.migrate_store(store.open(old), log=lambda m: None)
    assert "boolq/llama/fp16" in report.moved
    run = store.open(old).run("boolq/llama/fp16")
    assert run.files != run.dir and run.complete and run.predictions().num_rows == 3


def test_an_old_run_resumes_in_place_and_a_new_run_joins_the_old_store(old):
    s = store.open(old)
    run = s.run("boolq/llama/fp16")
    m = run.manifest
    want = run.activations(2).compute()
    last = run.layout.n_units - 1
    r0, r1 = run.layout.unit_rows(last)
    part = pq.read_table(run.files / "_predictions" / f"u{last:07d}.parquet").to_pydict()
    (run.files / "_progress" / f"u{last:07d}.done").unlink()
    spec = RunSpec(
        key=run.key,
        manifest={k: v for k, v in m.items() if k not in ("schema", "fingerprint")},
        layout=run.layout,
        token_ids=run.token_index()["token_id"].to_numpy(),
        gold=run.examples()["gold"].to_numpy(),
        n_truncated=run.examples()["n_truncated"].to_numpy(),
        arrays=(ArraySpec("layers/L002/activations", m["n_neurons"], m["dtype"]),),
        source_rows=run.examples()["source_row"].to_numpy(),
    )
    writer = RunWriter.open(s, spec)
    assert writer.files == run.dir and writer.pending_units() == [last]
    columns = {k: np.asarray(v) for k, v in part.items()}  # (examples,) or (examples, labels)
    writer.write_unit(last, {"layers/L002/activations": want[r0:r1]}, columns)
    assert (run.dir / "_progress" / f"u{last:07d}.done").exists()
    assert not (old / "_qcache" / "runs" / "boolq").exists()
    again = store.open(old).run("boolq/llama/fp16")
    assert again.complete
    np.testing.assert_array_equal(again.activations(2).compute(), want)

    from tests.synthetic import write_run

    write_run(old, {1: np.ones((8, 4), np.float16)}, np.array([4, 4]), model="synth")
    assert json.loads((old / "zarr.json").read_text())["attributes"]["qcache"]["schema"] == 2
    s = store.open(old)
    assert [str(k) for k in s.runs()] == [*RUNS, "boolq/synth/fp16"]
    assert s.run("boolq/synth/fp16").files == old / "_qcache/runs/boolq/synth/fp16"
    assert s.run("boolq/llama/fp32").files == old / "runs/boolq/llama/fp32"


def test_migrate_skips_a_run_being_written(old):
    from qcache.store.migrate import migrate_store
    from qcache.store.writer import locked, writers_lock

    s = store.open(old)
    busy = s.run("boolq/llama/fp32").key
    with locked(writers_lock(s, busy), wait=False, shared=True):  # as a live extraction holds it
        report = migrate_store(s, log=lambda m: None)
    assert report.busy == [str(busy)] and report.moved == ["boolq/llama/fp16"]
    assert store.open(old).run(busy).files == old / "runs" / str(busy)  # left where it was, whole
    assert json.loads((old / "zarr.json").read_text())["attributes"]["qcache"]["schema"] == 1
    assert migrate_store(store.open(old), log=lambda m: None).moved == [str(busy)]


def test_old_runs_are_named_with_the_migrate_hint_and_prompts_read_as_none(old, tmp_path):
    import qcache
    from qcache.store.store import upgrade_root

    upgrade_root(old)  # the case met in the field: a schema-2 root (a new run was added) over schema-1 runs
    hint = f"note: 2 runs were written by an older qcache (schema 1): `qcache migrate --store {old}`"
    for fmt in ("table", "json"):
        res = CliRunner().invoke(main, ["ls", "--store", str(old), "--format", fmt])
        assert res.exit_code == 0, res.output
        assert [ln for ln in res.stderr.splitlines() if ln.startswith("note:")] == [
            hint + " makes them readable by plain zarr/xarray"
        ]
        assert "note:" not in res.stdout
    s = qcache.open(old)
    assert "2 of schema 1 (qcache migrate" in repr(s)
    prompts = s.run(RUNS[0]).examples()["prompt"].tolist()
    assert prompts == [None] * 3  # not NaN: these runs never stored a prompt

    res = CliRunner().invoke(main, ["migrate", "--store", str(old)])
    assert res.exit_code == 0, res.output
    assert not (old / "_qcache" / "migrating").exists()  # no empty staging directories left behind
    res = CliRunner().invoke(main, ["ls", "--store", str(old)])
    assert res.exit_code == 0 and "note:" not in res.output
    assert "schema 1" not in repr(qcache.open(old))


def test_opening_a_run_directory_names_its_store(old, monkeypatch):
    import qcache
    from qcache.store.errors import StoreError

    for inside in ("runs/boolq/llama/fp16", "runs/boolq/llama/fp16/layers/L002"):
        with pytest.raises(StoreError) as info:
            qcache.open(old / inside)
        msg = str(info.value)
        assert f"inside the qcache store {old.resolve()}: open {old.resolve()}" in msg and "\n" not in msg
    monkeypatch.setenv("HOME", str(old.parent))
    assert qcache.open(f"~/{old.name}").runs() == qcache.open(old).runs()  # ~ expanded, as in a shell
