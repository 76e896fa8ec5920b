"""A store from a real tiny extraction, read by plain zarr, xarray and DuckDB: the layout docs/store.md gives.

Oracles: the tokenizer (token ids, decoding), the dataset file the test writes (prompts, gold), the manifest
read with ``json``, numpy; never qcache's own reading where the point is that others can read.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import transformers as tf
import xarray as xr
import zarr
from click.testing import CliRunner

from qcache import store
from qcache.analyze.runner import AnalyzeConfig, run_calibration
from qcache.cli import main
from qcache.store.errors import NotStored
from qcache.store.tables import run_sql
from tests.commands import extract_args
from tests.token_oracle import unescape

ROWS = [
    ("Is the sky blue?\nAnswer:", "True"),
    ("Two  spaces,\ta tab and é ☃ \\ here.\nAnswer:", "False"),
    ("True or false:  water is dry\nAnswer:", "False"),
    ("Line one\n\nline three\nAnswer:", "True"),
]


@pytest.fixture(scope="module")
def extracted(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """Two runs (fp32, fp16) of a dataset whose prompts hold newlines, double spaces, a tab, non-ASCII."""
    root = tmp_path_factory.mktemp("interop")
    data = root / "odd.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": g}) + "\n" for t, g in ROWS), encoding="utf-8")
    options = ("--dataset", str(data), "--layers", "1,3", "--tap", "act", "--tap", "resid")
    options += ("--chunk-rows", "16", "--batch-size", "2")
    for bits in (32, 16):
        args = extract_args(tiny_models["llama"], root / "s", *options, bits=bits, limit=len(ROWS))
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    return root / "s", tiny_models["llama"]


def _walk(path: Path) -> tuple[dict[str, zarr.Array], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        members = dict(zarr.open_group(str(path), mode="r").members(max_depth=None))
    return {k: v for k, v in members.items() if isinstance(v, zarr.Array)}, caught


def _arrays_on_disk(path: Path) -> set[str]:
    """Every directory whose zarr.json says ``array``, found with the file system."""
    out = set()
    for meta in path.rglob("zarr.json"):
        if json.loads(meta.read_text())["node_type"] == "array":
            out.add(meta.parent.relative_to(path).as_posix())
    return out


def test_token_strings_and_prompts_decode_without_the_tokenizer(extracted):
    path, model_dir = extracted
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    s = store.open(path)
    for key in s.runs():
        run = s.run(key)
        ids = run.token_index()["token_id"].to_numpy()
        strings = run.token_strings()
        assert strings.shape == ids.shape and strings.dtype == object
        examples = run.examples().to_pydict()
        assert examples["prompt"] == [t for t, _ in ROWS]  # the exact text that was tokenized
        assert examples["gold_word"] == [g for _, g in ROWS]
        for e, (text, _) in enumerate(ROWS):
            rows = slice(run.layout.starts[e], run.layout.starts[e] + run.layout.lengths[e])
            expected = tokenizer(text).input_ids
            assert ids[rows].tolist() == expected
            assert strings[rows][0] == "<s>"  # BOS, a special token, as itself
            decoded = b"".join(unescape(x) for x in strings[rows][1:])
            assert decoded.decode() == tokenizer.decode(expected[1:]) == text
        newline, space = (tokenizer(t, add_special_tokens=False).input_ids for t in ("\n", " "))
        assert len(newline) == len(space) == 1
        assert set(strings[ids == newline[0]]) == {"\\n"} and set(strings[ids == space[0]]) == {" "}
        preds = run.predictions().to_pydict()
        assert preds["pred_word"] == [run.label_words[p] for p in preds["pred_label"]]
        for top_id, top in zip(preds["top_token_id"], preds["top_token"], strict=True):
            text = tokenizer.decode([top_id])
            if "\ufffd" not in text:
                assert unescape(top) == text.encode()  # not stripped: the token's own text


def test_zarr_walks_every_array_without_warnings_and_each_has_dimension_names(extracted):
    path, _ = extracted
    arrays, caught = _walk(path)
    assert not caught, [str(w.message) for w in caught]
    on_disk = _arrays_on_disk(path)
    assert set(arrays) == on_disk
    assert {"_qcache"} <= set(arrays)
    s = store.open(path)
    for key in s.runs():
        prefix = f"runs/{key}/"
        mine = {k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)}
        n_tokens = store.open(path).run(key).layout.n_tokens
        want = {
            "tokens/example_id": ("token",),
            "tokens/position": ("token",),
            "tokens/token_id": ("token",),
            "tokens/token": ("token",),
            "examples/prompt": ("example",),
            "examples/gold": ("example",),
            "layers/L001/activations": ("token", "neuron"),
            "layers/L003/resid": ("token", "hidden"),
        }
        for name, dims in want.items():
            assert mine[name].metadata.dimension_names == dims, name
            assert mine[name].shape[0] == (n_tokens if dims[0] == "token" else len(ROWS))
        for name, a in mine.items():
            assert a.metadata.dimension_names is not None and len(a.metadata.dimension_names) == a.ndim, name
    # nothing but Zarr nodes in a run's group, and bookkeeping beside the runs, not in them
    for key in s.runs():
        run_dir = path / "runs" / str(key)
        assert not [p for p in run_dir.iterdir() if not (p / "zarr.json").exists() and p.name != "zarr.json"]
        assert (path / "_qcache" / "runs" / str(key) / "_created").exists()


def test_tables_beside_the_runs_keep_the_walk_clean(extracted, tmp_path):
    import shutil

    path = tmp_path / "s"
    shutil.copytree(extracted[0], path)
    run_calibration(AnalyzeConfig(store=path), log=lambda m: None)
    assert (path / "tables" / "predictions").is_dir()
    arrays, caught = _walk(path)
    assert not caught, [str(w.message) for w in caught]
    assert "tables" in arrays and arrays["tables"].shape == ()  # a placeholder: Zarr does not look inside


def test_xarray_datatree_opens_the_store_and_the_documented_recipe_works(extracted):
    path, _ = extracted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(str(path), engine="zarr", consolidated=False)
    s = store.open(path)
    for key in s.runs():
        run_dir = path / "runs" / str(key)
        raw = zarr.open_array(str(run_dir / "layers/L001/activations"), mode="r")[:]
        lengths = zarr.open_array(str(run_dir / "examples/length"), mode="r")[:]
        node = tree[f"runs/{key}"]
        # docs/store.md: a layer's activations with the token coordinates
        acts = node["layers/L001/activations"].assign_coords(node["tokens"].coords)
        assert acts.dims == ("token", "neuron")
        np.testing.assert_array_equal(acts.values, raw)
        np.testing.assert_array_equal(acts["example_id"].values, np.repeat(np.arange(len(lengths)), lengths))
        np.testing.assert_array_equal(
            acts["position"].values, np.concatenate([np.arange(n) for n in lengths])
        )
        assert list(acts["token"].values) == list(s.run(key).token_strings())
        assert node["layers/L003/resid"].dims == ("token", "hidden")
        assert list(node["examples"]["prompt"].values) == [t for t, _ in ROWS]
        assert json.loads(json.dumps(node.attrs["manifest"]))["quant"] == key.quant
        # one run on its own, one group at a time
        one = xr.open_zarr(str(run_dir), group="layers/L001", consolidated=False)
        np.testing.assert_array_equal(one["activations"].values, raw)
        # per-example means with plain xarray
        means = acts.astype("float64").groupby("example_id").mean()
        np.testing.assert_allclose(
            means.values[1], raw[lengths[0] : lengths[0] + lengths[1]].astype(np.float64).mean(0), rtol=1e-12
        )


def test_sql_views_runs_examples_tokens(extracted):
    path, model_dir = extracted
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    s = store.open(path)
    cols, rows = run_sql(s.results, "SELECT * FROM runs ORDER BY quant", store=s)
    assert len(rows) == 2
    for row in rows:
        got = dict(zip(cols, row, strict=True))
        manifest = json.loads((path / "runs" / got["run"] / "zarr.json").read_text())["attributes"][
            "manifest"
        ]
        assert got["model"] == manifest["model"] and got["quant"] == manifest["quant"]
        assert json.loads(got["quant_config"]) == manifest["quant_config"]
        assert got["template"] == manifest["dataset"]["template"] == "{text}"
        assert got["batch_size"] == manifest["batching"]["batch_size"] == 2
        assert got["max_length"] == 512 and got["n_examples"] == len(ROWS)
        assert got["torch_version"] == manifest["versions"]["torch"] and got["device"] == manifest["device"]
        assert got["created_at"].isoformat() == manifest["created_at"]
        assert got["complete"] and got["has_token_strings"] and got["layers"] == [1, 3]
    _, rows = run_sql(
        s.results, "SELECT example_id, prompt, gold_word FROM examples WHERE quant='fp32'", store=s
    )
    assert sorted(rows) == [(i, t, g) for i, (t, g) in enumerate(ROWS)]
    query = (
        "SELECT e.example_id, list(t.token_id ORDER BY t.position), list(t.token ORDER BY t.position) "
        "FROM tokens t JOIN examples e USING (run, example_id) WHERE t.quant = 'fp16' GROUP BY 1 ORDER BY 1"
    )
    _, rows = run_sql(s.results, query, store=s)
    for (_, ids, strings), (text, _) in zip(rows, ROWS, strict=True):
        assert ids == tokenizer(text).input_ids
        assert b"".join(unescape(x) for x in strings[1:]).decode() == text
    result = CliRunner().invoke(
        main,
        [
            "sql",
            "--store",
            str(path),
            "--format",
            "csv",
            "SELECT count(*) AS n FROM tokens WHERE token = '\\n'",
        ],
    )
    assert result.exit_code == 0, result.output
    (nl,) = tokenizer("\n", add_special_tokens=False).input_ids
    newlines = sum(tokenizer(t).input_ids.count(nl) for t, _ in ROWS)
    assert newlines >= len(ROWS) and result.output.splitlines() == ["n", str(2 * newlines)]


def test_runs_without_token_strings_say_so(tmp_path):
    from tests.synthetic import write_run

    run = write_run(tmp_path / "s", {1: np.zeros((8, 4), np.float16)}, np.array([4, 4]))
    assert not run.has_token_strings
    with pytest.raises(NotStored, match="holds no token strings"):
        run.token_strings()
    assert run.examples()["prompt"].null_count == 2
