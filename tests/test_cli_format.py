"""The command line's shared conventions: --format table|json|csv, renamed options, comma lists, examples.

Each format is parsed back with the standard library (json, csv) and compared with the others and with
the readable table (cut at the header's column starts); thresholds are checked against numpy.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from qcache.cli import main
from tests.synthetic import write_run

# Neuron scales spread over 0.02..1.0: thresholds between them give different dead counts
SCALES = np.linspace(0.02, 1.0, 40)


def _acts(seed: int, n: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, len(SCALES))) * SCALES
    x[:, 3] = x[:, 4]  # r = 1
    x[:, 7] = 0.5 * x[:, 8] + 0.3 * rng.standard_normal(n) * SCALES[7]  # r high, not 1
    return x.astype(np.float16)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("fmt") / "s"
    for quant, seed in (("fp16", 0), ("nf4", 1)):
        write_run(r, {1: _acts(seed), 5: _acts(seed + 10)}, np.full(15, 20), quant=quant)
    return r


def _ok(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def _analyze(root: Path, *args: str) -> str:
    return _ok(["analyze", *args, "--store", str(root), "--scheduler", "sync"])


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _aligned(text: str) -> list[dict[str, str]]:
    """A readable table cut at the columns' start offsets in its header line (cells are left-aligned)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    heads = list(re.finditer(r"\S+", lines[0]))
    names, starts = [m.group() for m in heads], [m.start() for m in heads]
    ends = [*starts[1:], None]
    return [{n: ln[s:e].strip() for n, s, e in zip(names, starts, ends, strict=True)} for ln in lines[1:]]


def _same_cell(value, text: str) -> bool:
    """A JSON value and its CSV cell: numbers exactly, None as an empty cell, NaN as null."""
    if value is None:
        return text in ("", "nan")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value) == text
    return float(text) == value


def _shown(value) -> str:
    """How the readable table shows a JSON value: floats to 4 decimals."""
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _agree(rows_json: list[dict], rows_csv: list[dict[str, str]], rows_table: list[dict[str, str]] | None):
    assert len(rows_json) == len(rows_csv) and rows_json
    assert list(rows_csv[0]) == list(rows_json[0])
    for j, c in zip(rows_json, rows_csv, strict=True):
        assert all(_same_cell(j[k], c[k]) for k in j), (j, c)
    if rows_table is not None:
        assert rows_table == [{k: _shown(v) for k, v in j.items()} for j in rows_json]


@pytest.mark.parametrize(
    ("command", "options"),
    [("dead", ["--layers", "1,5"]), ("redundancy", []), ("calibration", [])],
)
def test_analyze_formats_give_the_same_rows(root, command, options):
    if command == "calibration":
        args = [command, *options, "--store", str(root)]
        out = {f: _ok(["analyze", *args, "--format", f]) for f in ("table", "json", "csv")}
    else:
        out = {f: _analyze(root, command, *options, "--format", f) for f in ("table", "json", "csv")}
    _agree(json.loads(out["json"]), _csv(out["csv"]), _aligned(out["table"]))


def test_dead_counts_match_numpy_and_the_old_spelling(root):
    """--dead-threshold t counts neurons with every |activation| <= t (silu, non-ReLU), as numpy does."""
    for t in (0.1, 0.45):
        new = json.loads(
            _analyze(root, "dead", "--bits", "16", "--dead-threshold", str(t), "--format", "json")
        )
        old = json.loads(_analyze(root, "dead", "--bits", "16", "--threshold", str(t), "--json"))
        assert new == old
        for row in new:
            acts = _acts(0) if row["layer"] == 1 else _acts(10)
            assert row["n_dead"] == int((np.abs(acts.astype(np.float64)) <= t).all(axis=0).sum())
    assert new != json.loads(_analyze(root, "dead", "--bits", "16", "--format", "json"))  # not the default


def test_r_threshold_counts_pairs_as_numpy_and_the_old_spelling(root):
    for r in (0.5, 0.95):
        new = json.loads(
            _analyze(root, "redundancy", "--bits", "4", "--r-threshold", str(r), "--format", "json")
        )
        old = json.loads(
            _analyze(root, "redundancy", "--bits", "4", "--threshold", str(r), "--format", "json")
        )
        assert new == old
        for row in new:
            acts = (_acts(1) if row["layer"] == 1 else _acts(11)).astype(np.float64)
            c = np.abs(np.corrcoef(acts.T))
            assert row["pairs_above"] == int((c[np.triu_indices_from(c, 1)] >= r).sum())


def test_giving_both_spellings_is_a_usage_error(root):
    res = CliRunner().invoke(
        main, ["analyze", "dead", "--store", str(root), "--threshold", "0.2", "--dead-threshold", "0.3"]
    )
    assert res.exit_code == 2 and "old spelling of --dead-threshold" in res.output
    res = CliRunner().invoke(main, ["ls", "--store", str(root), "--json", "--format", "csv"])
    assert res.exit_code == 2 and "--format json" in res.output


def test_old_spellings_are_hidden_from_help():
    for args in (["analyze", "dead"], ["analyze", "redundancy"], ["analyze", "salience"], ["ls"]):
        text = _ok([*args, "--help"])
        assert "--threshold" not in text.replace("-threshold", "") and "--json" not in text.replace(
            "--json is short", ""
        ), args


def test_analyze_all_json_and_csv_hold_every_table(root):
    out_json = json.loads(_analyze(root, "all", "--format", "json"))
    rows = _csv(_analyze(root, "all", "--format", "csv"))
    assert set(out_json) == {"calibration", "dead", "redundancy", "drift"}  # the store has fp16 and nf4
    for name, table in out_json.items():
        mine = [{k: r[k] for k in table[0]} for r in rows if r["table"] == name]
        _agree(table, mine, None)
    assert len(rows) == sum(len(t) for t in out_json.values())
    text = _analyze(root, "all")
    assert all(f"{name}:" in text for name in out_json)


def test_ls_models_and_sql_formats_agree(root):
    store = ["--store", str(root)]
    ls_json = json.loads(_ok(["ls", *store, "--format", "json"]))
    assert ls_json == json.loads(_ok(["ls", *store, "--json"]))
    ls_csv = _csv(_ok(["ls", *store, "--format", "csv"]))
    assert [json.loads(r["shape"]) for r in ls_csv] == [r["shape"] for r in ls_json] == [[300, 40]] * 4
    _agree(
        [{k: v for k, v in r.items() if k != "shape"} for r in ls_json],
        [{k: v for k, v in r.items() if k != "shape"} for r in ls_csv],
        None,
    )

    models = {f: _ok(["models", "--format", f]) for f in ("table", "json", "csv")}
    _agree(json.loads(models["json"]), _csv(models["csv"]), _aligned(models["table"]))
    assert {"alias": "smollm2-135m", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"} in json.loads(
        models["json"]
    )

    _analyze(root, "dead")  # writes the dead_neurons table
    query = "SELECT quant, layer, n_dead, pct_dead FROM dead_neurons ORDER BY quant, layer"
    sql = {f: _ok(["sql", *store, "--format", f, query]) for f in ("table", "json", "csv")}
    _agree(json.loads(sql["json"]), _csv(sql["csv"]), _aligned(sql["table"]))


def test_json_has_no_nan_literals(tmp_path):
    """JSON has no NaN: an undefined number is null (Python's json would write the invalid NaN)."""
    r = tmp_path / "s"
    write_run(r, {1: _acts(2)}, np.full(15, 20))
    _ok(["analyze", "dead", "--store", str(r), "--scheduler", "sync"])
    out = _ok(["sql", "--store", str(r), "--format", "json", "SELECT 'nan'::DOUBLE AS x, 1.5::DOUBLE AS y"])
    assert "NaN" not in out and json.loads(out) == [{"x": None, "y": 1.5}]


def _walk(cmd: click.Command, path: list[str]):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, [*path, name])


def _examples(help_text: str) -> list[str]:
    tail = help_text[help_text.index("Examples:") :].splitlines()[1:]
    return [ln.strip() for ln in tail if ln.strip()]


def _parse(argv: list[str]) -> click.Context:
    """Resolve an example's command and parse its arguments as click would, without running it."""
    cmd: click.Command = main
    ctx = None
    name = "qcache"
    while True:
        if isinstance(cmd, click.Group) and argv and not argv[0].startswith("-"):
            ctx = click.Context(cmd, info_name=name, parent=ctx, **cmd.context_settings)
            name, argv = argv[0], argv[1:]
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"no command {name!r}"
            cmd = sub
            continue
        return cmd.make_context(name, list(argv), parent=ctx)


def test_every_help_ends_with_examples_that_parse():
    for path, cmd in _walk(main, ["qcache"]):
        # main's context settings (-h/--help): click caches each command's help option on first use
        ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=100, **main.context_settings)
        text = cmd.get_help(ctx)
        assert "Examples:" in text, path
        assert text.rstrip().splitlines()[-1].strip().startswith("qcache"), f"{path}: examples come last"
        lines = _examples(text)
        assert 2 <= len(lines) <= 3, path
        for line in lines:
            argv = shlex.split(line)
            assert argv[0] == "qcache"
            if len(path) > 1:
                assert argv[: len(path)] == path, f"{line!r} is not an example of {' '.join(path)}"
            parsed = _parse(argv[1:])  # unknown options, bad values and missing arguments raise here
            assert parsed.command.callback is not None


def test_a_bad_example_would_fail_to_parse():
    with pytest.raises(click.NoSuchOption):
        _parse(["analyze", "dead", "--no-such-option"])
    with pytest.raises(click.BadParameter):
        _parse(["extract", "--model", "m", "--tap", "act,nope"])


def test_tap_takes_comma_lists_like_layers(tmp_path):
    from qcache.commands.extraction import extract_config

    def taps(*args: str) -> tuple[str, ...]:
        ctx = _parse(["plan", "--model", "m", *args])
        return extract_config(str(tmp_path), dict(ctx.params), ctx).taps

    assert taps("--tap", "act,down-in") == ("act", "down-in") == taps("--tap", "act", "--tap", "down-in")
    assert taps("--tap", "resid,act", "--tap", "act") == ("resid", "act")
    assert taps() == ("act",)


def test_child_command_lines_keep_comma_taps():
    """The launcher repeats the parent's options for each child: a comma list must survive the trip."""
    from qcache.commands.extraction import _child_args

    ctx = _parse(["extract", "--model", "m", "--tap", "act,down-in", "--tap", "resid", "--processes", "2"])
    with ctx:
        args = _child_args(ctx)
    assert args[args.index("--tap") :][:4] == ["--tap", "act,down-in", "--tap", "resid"]
    again = _parse(["extract", *args])
    assert again.params["taps"] == (("act", "down-in"), ("resid",))


def test_plan_csv_is_its_json_flattened():
    args = ["plan", "--model", "smollm2-135m", "--bits", "4", "--limit", "8", "--device", "cpu"]
    plan = json.loads(_ok([*args, "--format", "json"]))
    rows = _csv(_ok([*args, "--format", "csv"]))

    def at(path: str):
        v = plan
        for k in path.split("."):
            v = v[int(k)] if isinstance(v, list) else v[k]
        return v

    varies = {"disk.free"}  # other processes write to this disk between the two calls
    assert rows and all(_same_cell(at(r["field"]), r["value"]) for r in rows if r["field"] not in varies)
    assert {r["field"] for r in rows} >= {"disk_ok", "memory_ok", "time.seconds", "disk.arrays.0.path"}
    assert math.isfinite(float(next(r["value"] for r in rows if r["field"] == "time.seconds")))


def test_salience_threshold_and_its_old_spelling_agree(tmp_path):
    """--salience-threshold t selects neurons strictly above t of the normalized attribution maximum;
    the old --threshold gives the same tables, and csv holds what json holds."""
    from tests.test_salience import _fake_run

    root = tmp_path / "s"
    _fake_run(root, "fp32", seed=1)
    _fake_run(root, "nf4", seed=2)
    store = ["--store", str(root)]
    new = json.loads(_ok(["analyze", "salience", *store, "--salience-threshold", "0.6", "--format", "json"]))
    old = json.loads(_ok(["analyze", "salience", *store, "--threshold", "0.6", "--json"]))
    default = json.loads(_ok(["analyze", "salience", *store, "--format", "json"]))
    assert new == old and new != default
    assert {r["threshold"] for r in new["counts"]} == {0.6}
    rows = _csv(_ok(["analyze", "salience", *store, "--salience-threshold", "0.6", "--format", "csv"]))
    for name, table in new.items():
        mine = [{k: r[k] for k in table[0]} for r in rows if r["table"] == name]
        _agree(table, mine, None)
