"""Kill -9 an extraction at chosen and random points, resume it, and get bit-for-bit the same store."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from qcache import store
from tests.commands import as_process, extract_args


def _argv(model_dir: Path, store_path: Path) -> list[str]:
    options = ("--layers", "1,2", "--chunk-rows", "16", "--batch-size", "4")
    return as_process(extract_args(model_dir, store_path, *options, limit=40))


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def _snapshot(path: Path) -> dict[str, np.ndarray]:
    s = store.open(path)
    run = s.run(s.runs()[0])
    assert run.complete
    out = {f"L{n}": run.activations(n).compute() for n in run.layers}
    for name, col in run.token_index().to_pydict().items():
        out[f"tokens.{name}"] = np.asarray(col)
    preds = run.predictions()
    for name in (
        "example_id",
        "gold",
        "pred_label",
        "confidence",
        "top_token_id",
        "top_token_prob",
    ):
        out[f"pred.{name}"] = preds[name].to_numpy()
    out["pred.label_prob"] = np.stack(preds["label_prob"].to_numpy(zero_copy_only=False))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("ref") / "store"
    result = _run(_argv(tiny_models["llama"], path))
    assert result.returncode == 0, result.stderr
    return path, _snapshot(path)


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_kills_inside_commits_then_resume(tmp_path, tiny_models, reference):
    """Each crash lands in a window of a unit's commit; each resume must redo exactly that unit."""
    path = tmp_path / "store"
    for point in ("chunks-written:0", "predictions-written:2", "chunks-written:5"):
        crashed = _run(_argv(tiny_models["llama"], path), env={"QCACHE_CRASH_AT": point})
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        run = store.open(path).run(store.open(path).runs()[0])
        unit = int(point.split(":")[1])
        assert unit not in run.done_units() and not run.complete  # the interrupted unit is not counted
        assert set(range(unit)) <= run.done_units()
    resumed = _run(_argv(tiny_models["llama"], path))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same(_snapshot(path), reference[1])


def test_kill_at_random_moments_then_resume(tmp_path, tiny_models, reference):
    path = tmp_path / "store"
    rng = random.Random(7)
    for _ in range(2):
        proc = subprocess.Popen(
            _argv(tiny_models["llama"], path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(2.0, 6.0))  # interpreter + model start take ~2-4 s; units follow quickly
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = _run(_argv(tiny_models["llama"], path))
    assert result.returncode == 0, result.stderr
    _assert_same(_snapshot(path), reference[1])


def test_resume_does_not_redo_finished_units(tiny_models, reference):
    path = reference[0]
    run = store.open(path).run(store.open(path).runs()[0])
    mtimes = {p: p.stat().st_mtime_ns for p in (run.files / "_progress").iterdir()}
    again = _run(_argv(tiny_models["llama"], path))
    assert again.returncode == 0 and "0 tokens written" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (run.files / "_progress").iterdir()} == mtimes
