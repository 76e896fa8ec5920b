"""Long work talks: what `qcache extract` says before loading, on resuming and when interrupted.

Through real processes on a tiny saved model: the mismatch check is shown to need no weights by deleting
them; the resume count is checked against the progress markers on disk; Ctrl-C is a real SIGINT.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcache.cli import main
from qcache.store.errors import RunMismatch
from tests.commands import as_process, extract_args

CHUNK = ("--chunk-rows", "16", "--batch-size", "4", "--layers", "1")


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def _invoke(args: list[str]) -> tuple[int, str]:
    """Run ``qcache ARGS`` in this process (torch is imported once): exit code and stderr."""
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stderr


@pytest.fixture
def model(tmp_path, tiny_models) -> Path:
    """A private copy of the tiny llama, so a test may delete its weights."""
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "tiny"))


def test_a_mismatch_with_the_stored_run_is_reported_before_the_weights_load(tmp_path, model):
    store = tmp_path / "store"
    code, err = _invoke(extract_args(model, store, *CHUNK))
    assert code == 0, err
    assert f"loading {model} at fp32 on cpu ..." in err.splitlines()
    weights = list(model.glob("*.safetensors"))
    assert weights
    for w in weights:  # nothing can load the model now: an answer must come from its config and tokenizer
        w.unlink()
    for option, value in (("--max-length", "64"), ("--layers", "2")):
        code, err = _invoke(extract_args(model, store, *CHUNK, option, value))
        lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "loading", "Traceback"))]
        assert code == RunMismatch.exit_code and len(lines) == 1, err
        assert (
            "exists with different arguments" in lines[0] and option.strip("-").replace("-", "_") in lines[0]
        )


def _markers(store: Path) -> list[Path]:
    return sorted(store.glob("_qcache/runs/*/*/*/_progress/u*.done"))  # bookkeeping (docs/store.md)


def test_a_resumed_run_says_how_many_units_are_done(tmp_path, model):
    store = tmp_path / "store"
    args = extract_args(model, store, *CHUNK, limit=12)
    crashed = _run(as_process(args), env={"QCACHE_CRASH_AT": "predictions-written:3"})  # in unit 3's commit
    assert crashed.returncode == -signal.SIGKILL
    assert "resuming" not in crashed.stderr
    done = len(_markers(store))
    code, err = _invoke(args)
    assert code == 0, err
    total = len(_markers(store))  # every unit's marker once the run is complete
    assert done == 3 and total > done
    lines = err.splitlines()
    said = [i for i, ln in enumerate(lines) if ln.startswith(f"resuming: {done} of {total} units done")]
    loading = [i for i, ln in enumerate(lines) if ln.startswith("loading ")]
    assert len(said) == 1 and len(loading) == 1 and said[0] < loading[0], err
    code, err = _invoke(args)  # nothing left: said at once, and no weights are loaded for nothing
    assert code == 0 and f"resuming: {total} of {total} units done" in err and "loading " not in err, err


def _read_available(fd: int) -> bytes:
    """What the non-blocking pipe ``fd`` holds now (nothing: b"")."""
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_ctrl_c_leaves_no_bar_after_the_interrupted_line(tmp_path, model):
    """SIGINT mid-run: exit 130, the bar ends its line before the message, and nothing is drawn after it."""
    store = tmp_path / "store"
    argv = [a for a in as_process(extract_args(model, store, *CHUNK, limit=400)) if a != "--quiet"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    seen = b""
    deadline = time.monotonic() + 240
    while not (b"tok/s" in seen and _markers(store)) and proc.poll() is None and time.monotonic() < deadline:
        seen += _read_available(fd)  # until the bar is drawn and a unit is committed
        time.sleep(0.05)
    assert proc.poll() is None, "the extraction finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode()
    assert proc.returncode == 130, err
    before, line, after = err.partition("interrupted: committed units are kept")
    assert line and before.endswith("\n"), err[-400:]  # the message starts on a line of its own
    assert after.count("\n") == 1 and after.strip().startswith("; rerun"), after  # then nothing at all
    assert "tok/s" in before and "%|" not in after
    assert _markers(store)  # what was committed before the interrupt is kept
