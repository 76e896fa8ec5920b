"""The launcher: one `qcache extract` child per device, each filling its shard of one run; torchrun ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from tests.commands import as_process, extract_args

OPTIONS = ("--layers", "1,3", "--chunk-rows", "64")  # 12 examples: ~9 units


def _args(model: Path, path: Path, *extra: str) -> list[str]:
    """``qcache extract`` arguments without ``--device`` (the launcher and torchrun choose it)."""
    args = extract_args(model, path, *OPTIONS, *extra, limit=12)
    i = args.index("--device")
    return args[:i] + args[i + 2 :]


def _run(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """Run as a process; the launcher keeps failed children's output under ``tmp``."""
    env = {**os.environ, "TMPDIR": str(tmp), **env}
    return subprocess.run(as_process(args), capture_output=True, text=True, timeout=300, env=env)


def _run_of(path: Path) -> store.Run:
    s = store.open(path)
    return s.run(s.runs()[0])


def _snapshot(path: Path) -> dict[str, np.ndarray]:
    """Arrays, token index and predictions of a finished run."""
    run = _run_of(path)
    assert run.complete
    out = {f"L{n}": run.activations(n).compute() for n in run.layers}
    for name, col in run.token_index().to_pydict().items():
        out[f"tokens.{name}"] = np.asarray(col)
    for name, col in run.predictions().to_pydict().items():
        out[f"pred.{name}"] = np.asarray(col)
    return out


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.models import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("launcher") / "llama")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, model: Path) -> dict[str, np.ndarray]:
    """The same run by one process on the CPU, no shards."""
    path = tmp_path_factory.mktemp("single") / "store"
    result = CliRunner().invoke(main, _args(model, path, "--device", "cpu"))
    assert result.exit_code == 0, result.output
    return _snapshot(path)


def test_processes_give_the_single_process_store(tmp_path, model, reference):
    path = tmp_path / "s"
    done = _run(_args(model, path, "--processes", "2"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "units done" in done.stdout
    _assert_same(_snapshot(path), reference)
    assert "--processes 2" in _run_of(path).manifest["command"]  # created once, by the parent


def test_a_failed_shard_is_named_and_a_rerun_finishes_the_run(tmp_path, model, reference):
    path = tmp_path / "s"
    args = _args(model, path, "--processes", "2")
    # unit 1 is shard 1/2's first: that child is killed inside its commit, shard 0/2 goes on
    crashed = _run(args, tmp_path, QCACHE_CRASH_AT="chunks-written:1")
    assert crashed.returncode == 1, crashed.stderr
    last = crashed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 shards failed: 1/2 (process 1): killed by SIGKILL"), last
    assert last.endswith("rerun the same command to resume") and "Traceback" not in crashed.stderr
    run = _run_of(path)
    assert set(run.layout.shard_units(0, 2)) <= run.done_units()  # the other shard went on to its end
    assert 1 not in run.done_units()
    resumed = _run(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same(_snapshot(path), reference)


def test_sigterm_stops_every_child(tmp_path):
    """SIGTERM to the launcher (here: this process) ends like Ctrl-C, and no child outlives it."""
    from qcache.extract.launch.launcher import Children
    from qcache.extract.launch.workers import Worker

    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]  # ignores the --shard ... it is given
    workers = [Worker(i, 2, f"process {i}", "cpu", {}) for i in range(2)]
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), Children(workers, sleeper, tmp_path) as children:
        assert signal.getsignal(signal.SIGTERM) is not before  # else SIGTERM would end pytest itself
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted at once
    assert len(children.procs) == 2 and all(p.poll() is not None for p in children.procs.values())
    assert signal.getsignal(signal.SIGTERM) is before  # the launcher's handler is gone again


def test_torchrun_rank_fills_exactly_its_shard(tmp_path, model, reference, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device auto is the CPU anywhere
    path = tmp_path / "s"
    result = CliRunner().invoke(main, _args(model, path), env={"RANK": "1", "WORLD_SIZE": "2"})
    assert result.exit_code == 0, result.output
    assert "torchrun: rank 1 of 2 fills --shard 1/2 on cpu" in result.stderr
    run = _run_of(path)
    mine = run.layout.shard_units(1, 2)
    assert run.done_units() == set(mine)
    rows = np.concatenate([np.arange(*run.layout.unit_rows(u)) for u in mine])
    np.testing.assert_array_equal(
        run.activations(3, allow_partial=True).compute()[rows], reference["L3"][rows]
    )


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        (["--gpus", "0"], {}, "--gpus 0: no CUDA device is visible here; use --processes N"),
        (["--gpus", "1,1"], {}, "--gpus 1,1: GPU 1 is listed twice"),
        (["--gpus", "first"], {}, "--gpus 'first' is not a comma list of GPU ids"),
        (["--gpus", "0", "--processes", "2"], {}, "--gpus and --processes cannot be combined"),
        (["--gpus", "0", "--shard", "0/2"], {}, "--shard cannot be combined with --gpus"),
        (["--processes", "2", "--device", "cuda"], {}, "--device cuda cannot be combined with --processes"),
        (["--processes", "0"], {}, "--processes 0 must be at least 1"),
        (["--processes", "2", "--node", "2/2"], {}, "--node 2/2: need 0 <= K < M"),
        (["--node", "0/2"], {}, "--node needs --gpus or --processes"),
        (["--processes", "2"], {"RANK": "0", "WORLD_SIZE": "2"}, "--processes cannot run under torchrun"),
        (["--overwrite"], {"RANK": "0", "WORLD_SIZE": "2"}, "--overwrite under torchrun"),
    ],
)
def test_bad_launcher_options_are_one_line(tmp_path, model, extra, env, message, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no GPU, even on a GPU machine
    result = CliRunner().invoke(main, _args(model, tmp_path / "s", *extra), env=env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not (tmp_path / "s").exists()
