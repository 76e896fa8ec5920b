"""Several extraction processes on one store: shards, different runs, and a refused duplicate."""

from __future__ import annotations

import os
import subprocess

import numpy as np

from qcache import store
from tests.commands import as_process, extract_args


def _argv(model_dir, path, *extra):
    return as_process(
        extract_args(model_dir, path, "--layers", "1,3", "--chunk-rows", "16", *extra, limit=30)
    )


def _start(argv, **env):
    # one thread each: four processes with a thread per core each oversubscribe a 2-core machine
    # several times over, and OpenMP's spinning threads then take minutes instead of seconds
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_shards_and_other_runs_fill_one_store_at_once(tmp_path, tiny_models):
    path = tmp_path / "s"
    procs = [
        _start(_argv(tiny_models["llama"], path, "--shard", "0/2")),
        _start(_argv(tiny_models["llama"], path, "--shard", "1/2")),
        _start(_argv(tiny_models["phi"], path)),
        _start(_argv(tiny_models["llama"], path, "--dataset", "toxicity")),
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    s = store.open(path)
    assert len(s.runs()) == 3 and all(s.run(k).complete for k in s.runs())
    ref_path = tmp_path / "ref"
    assert subprocess.run(_argv(tiny_models["llama"], ref_path), capture_output=True).returncode == 0
    ref = store.open(ref_path).run(store.open(ref_path).runs()[0])
    got = s.run(f"boolq/{ref.key.model}/fp32")
    for layer in (1, 3):
        np.testing.assert_array_equal(got.activations(layer).compute(), ref.activations(layer).compute())
    assert got.predictions().equals(ref.predictions())


def test_second_process_on_the_same_shard_is_refused(tmp_path, tiny_models):
    import fcntl

    path = tmp_path / "s"
    crashed = subprocess.run(
        _argv(tiny_models["llama"], path),
        capture_output=True,
        env={**os.environ, "QCACHE_CRASH_AT": "chunks-written:0"},
    )
    assert crashed.returncode != 0
    (files,) = path.glob("_qcache/runs/*/*/fp32")  # the run's bookkeeping directory
    # hold shard 0/1 the way a live extraction does (flock dies with its holder, here this test)
    with open(files / ".shard-0-of-1.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = subprocess.run(
            _argv(tiny_models["llama"], path), capture_output=True, text=True, timeout=300
        )
    assert second.returncode == 2
    assert "being written by another process" in second.stderr and "Traceback" not in second.stderr
    other_shard = subprocess.run(
        _argv(tiny_models["llama"], path), capture_output=True, text=True, timeout=300
    )
    assert other_shard.returncode == 0, other_shard.stderr  # lock released: it resumes and finishes
