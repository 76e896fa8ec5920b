"""Command-line values that used to be accepted and give an empty or meaningless result (issue #16): each is
now one ``error:`` line, a non-zero exit, no traceback, and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcache.cli import main
from tests.commands import extract_args
from tests.synthetic import write_run


def _refused(args: list[str], *words: str) -> str:
    res = CliRunner().invoke(main, args)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--tap", ""), ("--tap was given an empty value", "names no tap point", "act")),
        (("--tap", ","), ("names no tap point",)),
        (("--layers", ""), ("--layers ''", "names no layer", "'paper'")),
        (("--layers", " , "), ("names no layer",)),
    ],
)
def test_empty_tap_or_layers_is_refused_before_anything_is_written(
    tmp_path: Path, extra: tuple[str, ...], words: tuple[str, ...]
) -> None:
    store = tmp_path / "store"
    _refused(extract_args("smollm2-135m", store, *extra), *words)
    assert not store.exists()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("thresholds") / "store"
    lengths = np.array([5, 9, 3, 8])
    acts = np.random.default_rng(0).normal(size=(int(lengths.sum()), 8)).astype(np.float32)
    write_run(root, {1: acts}, lengths, chunk_rows=8)
    return root


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["dead", "--dead-threshold", "-1"], ("--dead-threshold -1.0 must be a finite number >= 0",)),
        (["dead", "--dead-threshold", "nan"], ("--dead-threshold nan must be",)),
        (["dead", "--relu-eps", "-0.5"], ("--relu-eps -0.5 must be",)),
        (["redundancy", "--r-threshold", "1.5"], ("--r-threshold 1.5 must be in [0, 1]",)),
        (["redundancy", "--r-threshold", "-0.1"], ("--r-threshold -0.1 must be in [0, 1]",)),
        (["all", "--r-threshold", "inf"], ("--r-threshold inf must be in [0, 1]",)),
        (["redundancy", "--top-pairs", "-3"], ("--top-pairs -3 must be an int >= 0",)),
    ],
)
def test_nonsense_thresholds_are_refused(store: Path, args: list[str], words: tuple[str, ...]) -> None:
    _refused(["analyze", *args, "--store", str(store)], *words)
    assert not (store / "tables").exists()  # refused before any analysis ran
