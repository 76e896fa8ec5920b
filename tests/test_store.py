"""Store round trips and refusals, on a real Zarr store on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcache import store
from qcache.store import ArraySpec, RunKey, RunSpec, RunWriter, TokenLayout
from qcache.store.errors import InvalidName, RunMismatch, RunNotFound, StoreError
from qcache.store.keys import key_for_source, safe_name

MANIFEST = {
    "model_source": "tiny",
    "quant_config": {"quant": "fp16"},
    "dtype": "float16",
    "layers": [1],
    "taps": ["act"],
    "dataset": {"name": "d", "labels": ["False", "True"]},
    "max_length": 64,
    "chunk_rows": 8,
    "attributions": None,
    "n_examples": 0,
    "activation": "silu",
}


def make_spec(lengths, chunk_rows=8, dtype="float16", neurons=5, **manifest):
    layout = TokenLayout(lengths=np.asarray(lengths), chunk_rows=chunk_rows)
    m = {
        **MANIFEST,
        "chunk_rows": chunk_rows,
        "dtype": dtype,
        "n_examples": len(lengths),
        **manifest,
    }
    return RunSpec(
        key=RunKey("d", "m", "fp16"),
        manifest=m,
        layout=layout,
        token_ids=np.arange(layout.n_tokens, dtype=np.int32),
        gold=np.zeros(len(lengths), np.int16),
        n_truncated=np.zeros(len(lengths), np.int32),
        arrays=(ArraySpec("layers/L001/activations", neurons, dtype),),
    )


def fill(writer, data):
    layout = writer.spec.layout
    for u in writer.pending_units():
        r0, r1 = layout.unit_rows(u)
        owned = np.flatnonzero(layout.owner_units == u).astype(np.int32)
        writer.write_unit(
            u, {"layers/L001/activations": data[r0:r1]}, {"example_id": owned, "gold": owned % 2}
        )


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=12),
    chunk_rows=st.integers(1, 16),
    dtype=st.sampled_from(["float16", "float32"]),
)
def test_round_trip(tmp_path_factory, lengths, chunk_rows, dtype):
    s = store.open(tmp_path_factory.mktemp("s") / "store", create=True)
    spec = make_spec(lengths, chunk_rows, dtype)
    data = np.random.default_rng(0).standard_normal((spec.layout.n_tokens, 5)).astype(dtype)
    fill(RunWriter.open(s, spec), data)
    run = store.open(s.root).run("d/m/fp16")
    assert run.complete
    np.testing.assert_array_equal(run.activations(1).compute(), data)
    assert run.predictions()["example_id"].to_pylist() == list(range(len(lengths)))
    assert run.token_index()["token_id"].to_pylist() == list(range(spec.layout.n_tokens))


def test_unwritten_rows_read_as_nan_and_partial_runs_are_refused(tmp_path):
    s = store.open(tmp_path / "s", create=True)
    spec = make_spec([5, 5, 5, 5], chunk_rows=8)
    w = RunWriter.open(s, spec)
    w.write_unit(
        0,
        {"layers/L001/activations": np.ones((8, 5), np.float16)},
        {"example_id": np.array([0], np.int32)},
    )
    run = s.run("d/m/fp16")
    with pytest.raises(store.errors.IncompleteRun, match="allow_partial=True"):
        run.activations(1)
    acts = run.activations(1, allow_partial=True).compute()
    assert np.isfinite(acts[:8]).all() and np.isnan(acts[8:]).all()
    assert run.rows_done().sum() == 8 and not run.complete
    with pytest.raises(store.errors.IncompleteRun, match="allow-partial"):
        run.require_complete()
    assert w.pending_units() == [1, 2]


def test_resume_with_other_arguments_is_refused_naming_the_difference(tmp_path):
    s = store.open(tmp_path / "s", create=True)
    RunWriter.open(s, make_spec([3, 4]))
    with pytest.raises(RunMismatch, match="max_length: stored 64 vs requested 128"):
        RunWriter.open(s, make_spec([3, 4], max_length=128))
    RunWriter.open(s, make_spec([3, 4], max_length=128), overwrite=True)
    assert s.run("d/m/fp16").manifest["max_length"] == 128


def test_missing_run_lists_what_exists(tmp_path):
    s = store.open(tmp_path / "s", create=True)
    RunWriter.open(s, make_spec([3]))
    with pytest.raises(RunNotFound, match=r"runs here: d/m/fp16"):
        s.run("d/m/nf4")


def test_refuses_paths_that_are_not_stores(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        store.open(tmp_path / "file", create=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not a qcache store"):
        store.open(tmp_path / "other")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    )
    with pytest.raises(StoreError, match="not a qcache store"):
        store.open(tmp_path / "z")
    with pytest.raises(StoreError, match="no store at"):
        store.open(tmp_path / "missing")


@pytest.mark.parametrize(("schema", "message"), [(99, "newer than this qcache"), (0, "pre-release qcache")])
def test_other_schema_versions_are_recognized_and_refused(tmp_path, schema, message):
    s = store.open(tmp_path / "s", create=True)
    meta = json.loads((s.root / "zarr.json").read_text())
    meta["attributes"]["qcache"]["schema"] = schema
    (s.root / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=message):
        store.open(s.root)


@pytest.mark.parametrize("bad", ["a/b", "..", "../x", "x..y", "", "-x", "a b", "x" * 200])
def test_names_that_would_escape_the_store_are_refused(bad):
    with pytest.raises(InvalidName):
        safe_name(bad, "dataset")


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("meta-llama/Llama-2-7b-hf", "meta-llama--Llama-2-7b-hf"),
        ("/tmp/../x/model", "tmp--x--model"),
        ("a/../../etc", "a--etc"),
    ],
)
def test_keys_for_sources_stay_inside_the_store(source, key):
    assert key_for_source(source) == key


def test_overwrite_never_deletes_a_run_under_a_writer(tmp_path):
    from qcache.store.errors import RunBusy

    s = store.open(tmp_path / "s", create=True)
    spec = make_spec([3, 5, 4])
    first = RunWriter.open(s, spec)
    with first.claim(0, 1):
        with pytest.raises(RunBusy, match="another process"):
            RunWriter.open(s, spec, overwrite=True)
        assert (s.run_dir(spec.key) / "zarr.json").exists()
    second = RunWriter.open(s, spec, overwrite=True)  # nobody writes now: allowed
    # the stale writer may not write into the new run
    with pytest.raises(RunBusy, match="recreated"), first.claim(0, 1):
        pass
    with second.claim(0, 1):
        fill(second, np.ones((12, 5), np.float16))
    assert s.run(spec.key).complete


def _tree(root):
    """Every file under ``root`` with its bytes: what a refused reopen must leave as it was."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("token_id", "3 token id(s) differ, first at example 1 position 2: 0 stored vs 7"),
        ("length", "2 example length(s) differ, first example 0: 5 stored vs 6"),
        ("examples", "4 examples stored vs 3 here"),
    ],
)
def test_reopening_with_other_tokens_is_refused_and_touches_nothing(tmp_path, change, message):
    """Equal arguments, other tokens (another tokenizer version): rows would land in the wrong places."""
    from tests.synthetic import write_run

    lengths = np.array([5, 7, 4, 6])
    acts = {1: np.random.default_rng(0).standard_normal((22, 3)).astype(np.float32)}
    run = write_run(tmp_path / "s", acts, lengths, chunk_rows=8, units=[0, 2])  # token ids all 0
    s = store.open(tmp_path / "s")
    before = _tree(run.dir)

    def spec(lengths, token_ids):
        layout = TokenLayout(lengths=np.asarray(lengths), chunk_rows=8)
        arrays = (ArraySpec("layers/L001/activations", 3, "float32"),)
        e = layout.n_examples
        gold, cut = np.zeros(e, np.int16), np.zeros(e, np.int32)
        return RunSpec(run.key, run.manifest, layout, token_ids, gold, cut, arrays)

    assert RunWriter.open(s, spec(lengths, np.zeros(22, np.int32))).pending_units() == [1]  # same: resumes
    ids = np.zeros(22, np.int32)
    ids[[7, 9, 20]] = 7  # row 7 is example 1 (rows 5..11), position 2
    other = {
        "token_id": (lengths, ids),
        "length": ([6, 6, 4, 6], np.zeros(22, np.int32)),  # same token count, one boundary moved
        "examples": ([12, 4, 6], np.zeros(22, np.int32)),
    }[change]
    with pytest.raises(RunMismatch) as refused:
        RunWriter.open(s, spec(*other))
    text = str(refused.value)
    assert text.startswith(f"run {run.key}: token layout differs from the stored run: {message}"), text
    assert "same transformers/tokenizer and model revision on every node?" in text and "\n" not in text
    assert _tree(run.dir) == before
    reread = store.open(tmp_path / "s").run(run.key)
    assert reread.done_units() == {0, 2}
    np.testing.assert_array_equal(reread.activations(1, allow_partial=True).compute()[:8], acts[1][:8])


def test_processes_creating_one_store_at_once_all_get_it_and_lose_nothing(tmp_path):
    """Store creation is one atomic rename: racing creators all succeed, and none wipes what another wrote
    (zarr's mode "w" would delete it; a half-written zarr.json read "not a qcache store" before)."""
    import subprocess
    import sys
    import time

    root = tmp_path / "s"
    start = time.time() + 2.0
    code = (
        "import sys, time; from qcache.store import open_store; from pathlib import Path\n"
        f"time.sleep(max(0.0, {start} - time.time()))\n"
        "s = open_store(sys.argv[1], create=True)\n"
        "(Path(sys.argv[1]) / ('mine-' + sys.argv[2])).write_text('x')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(root), str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert sorted(p.name for p in root.glob("mine-*")) == [f"mine-{i}" for i in range(8)]
    assert store.open(root).runs() == [] and not list(tmp_path.glob(".*.tmp"))
