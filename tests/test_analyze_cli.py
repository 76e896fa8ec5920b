"""`qcache analyze calibration|dead|redundancy|all` through click, on real synthetic runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from qcache.cli import main
from tests.synthetic import write_run


def _acts(seed: int, n: int = 400, d: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.05, 1.0, d)
    x[:, 2] = 0.0  # dead and constant
    x[:, 5] = x[:, 6]  # r = 1
    return x.astype(np.float16)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("cli") / "s"
    for quant, seed in (("fp16", 0), ("nf4", 1)):
        write_run(r, {1: _acts(seed), 7: _acts(seed + 10)}, np.full(20, 20), quant=quant)
    return r


def _run(args: list[str], root: Path):
    return CliRunner().invoke(main, ["analyze", *args, "--store", str(root)])


def _table(root: Path, name: str) -> list[dict]:
    parts = sorted((root / "tables" / name).glob("*.parquet"))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def test_each_command_and_all(root):
    for cmd, *args in (
        ["calibration"],
        ["dead", "--scheduler", "sync"],
        ["redundancy", "--scheduler", "sync"],
    ):
        res = _run([cmd, *args], root)
        assert res.exit_code == 0, res.output
    assert {r["quant"] for r in _table(root, "metrics")} == {"fp16", "nf4"}
    dead = _table(root, "dead_neurons")
    assert {(r["quant"], r["layer"]) for r in dead} == {(q, n) for q in ("fp16", "nf4") for n in (1, 7)}
    assert all(r["n_dead"] >= 1 for r in dead)
    summary = _table(root, "redundancy_summary")
    assert all(r["n_constant"] == 1 and r["pairs_above"] >= 1 for r in summary)
    res = _run(["all", "--memory-limit", "64MB"], root)
    assert res.exit_code == 0, res.output
    assert "pairs_above" in res.output and "n_dead" in res.output and "ace" in res.output


def test_filters_select_runs_and_layers(root):
    res = _run(["dead", "--bits", "4", "--layers", "7", "--dataset", "boolq", "--model", "synth"], root)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.split()[:1] == ["boolq"]]  # table rows, not logs
    assert len(lines) == 1 and "nf4" in lines[0] and " 7 " in f" {lines[0]} "
    res = _run(["redundancy", "--bits", "16", "--layers", "1,7", "--r-threshold", "0.9"], root)
    assert res.exit_code == 0, res.output
    assert sum(ln.split()[:1] == ["boolq"] for ln in res.output.splitlines()) == 2


def test_unknown_run_filter_is_one_error_line_listing_the_runs(root):
    res = _run(["dead", "--model", "nope"], root)
    assert res.exit_code != 0 and "Traceback" not in res.output
    err = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(err) == 1 and "boolq/synth/fp16" in err[0] and "boolq/synth/nf4" in err[0]


def test_bad_layer_and_memory_limit_are_clean_errors(root):
    cases = ((["dead", "--layers", "3"], "cached"), (["redundancy", "--memory-limit", "lots"], "size"))
    for args, words in cases:
        res = _run(args, root)
        assert res.exit_code != 0 and "Traceback" not in res.output and words in res.output


def test_partial_runs_need_allow_partial(tmp_path):
    r = tmp_path / "s"
    write_run(r, {1: _acts(3, n=256)}, np.full(16, 16), chunk_rows=64, units=[0, 2])
    res = _run(["dead"], r)
    assert res.exit_code != 0 and "--allow-partial" in res.output
    res = _run(["dead", "--allow-partial", "--scheduler", "sync"], r)
    assert res.exit_code == 0, res.output
    assert "% of tokens extracted so far" in res.output
