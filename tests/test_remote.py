"""Stores read where they live: fsspec's memory filesystem, a real S3 server (moto) and plain HTTP.

Each remote copy is compared with the local store it was uploaded from: the same runs, arrays, predictions,
analysis tables and SQL answers. The HTTP test also logs every request to prove reads are lazy.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qcache.analyze.runner import AnalyzeConfig, run_calibration, run_dead, run_redundancy
from qcache.store import open_store
from qcache.store.errors import StoreError
from qcache.store.listing import describe_store
from qcache.store.tables import run_sql
from qcache.store.verify import verify_store
from tests.commands import as_process
from tests.synthetic import write_run

QUIET = {"log": lambda m: None}
DEAD_SQL = "SELECT quant, layer, neuron, min, max, mean, dead FROM neuron_stats ORDER BY 1, 2, 3"


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs (fp16, nf4) of two layers, with calibration tables already in the store."""
    root = tmp_path_factory.mktemp("remote") / "store"
    rng = np.random.default_rng(7)
    for quant in ("fp16", "nf4"):
        acts = {n: rng.standard_normal((600, 96)).astype(np.float16) for n in (1, 3)}
        acts[3][:, 5] = 0.01  # a dead, constant neuron
        write_run(root, acts, np.full(30, 20), quant=quant)
    run_calibration(AnalyzeConfig(store=root), **QUIET)
    return root


def _same_runs(remote, local_store) -> None:
    assert remote.runs() == local_store.runs()
    for key in local_store.runs():
        a, b = remote.run(key), local_store.run(key)
        assert a.manifest == b.manifest and a.done_units() == b.done_units()
        for layer in b.layers:
            np.testing.assert_array_equal(a.activations(layer).compute(), b.activations(layer).compute())
        assert a.predictions().equals(b.predictions())
        assert a.token_index().equals(b.token_index())


def test_memory_store_reads_analyzes_and_queries_like_the_local_one(local, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    name = f"/qc-{uuid.uuid4().hex[:8]}"
    fs.put(str(local), name, recursive=True)
    try:
        remote, here = open_store(f"memory://{name}"), open_store(local, results=tmp_path)
        _same_runs(remote, here)
        assert [r["size_mb"] for r in describe_store(remote)] == [r["size_mb"] for r in describe_store(here)]
        assert verify_store(remote).ok
        run_dead(AnalyzeConfig(store=remote), **QUIET)  # tables written into the memory store
        run_dead(AnalyzeConfig(store=here), **QUIET)
        assert fs.exists(f"{name}/tables/neuron_stats")
        assert run_sql(remote.results, DEAD_SQL) == run_sql(here.results, DEAD_SQL)
        with pytest.raises(StoreError, match="local directory"):
            open_store(f"memory://{name}", create=True)
    finally:
        fs.rm(name, recursive=True)


# -- S3: a real S3-compatible server (moto) on loopback -----------------------------------------------


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _qcache(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        as_process(list(args)), capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300
    )


def test_s3_store_through_the_cli_with_a_distributed_cluster(local, s3_env, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("qcache-test")
    fs.put(str(local), "qcache-test/store", recursive=True)
    url = "s3://qcache-test/store"

    ls = _qcache("ls", "--store", url, "--json")
    assert ls.returncode == 0, ls.stderr
    assert {(r["quant"], r["layer"]) for r in json.loads(ls.stdout)} == {
        (q, n) for q in ("fp16", "nf4") for n in (1, 3)
    }
    # workers are separate processes: each opens the bucket itself from the pickled graph
    red = _qcache("analyze", "redundancy", "--store", url, "--scheduler", "local-cluster")
    assert red.returncode == 0, red.stderr
    assert fs.exists("qcache-test/store/tables/redundancy")
    run_redundancy(AnalyzeConfig(store=open_store(local, results=tmp_path)), **QUIET)
    query = "SELECT quant, layer, bin_lo, pairs FROM redundancy ORDER BY 1, 2, 3"
    remote_rows = _qcache("sql", query, "--store", url, "--format", "json")
    assert remote_rows.returncode == 0, remote_rows.stderr
    cols, rows = run_sql(tmp_path, query)
    assert json.loads(remote_rows.stdout) == [dict(zip(cols, r, strict=True)) for r in rows]

    bad = _qcache("extract", "--model", "smollm2-135m", "--limit", "2", "--store", url)
    assert bad.returncode != 0 and "local directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    missing = _qcache("ls", "--store", "s3://qcache-test/nowhere")
    assert (
        missing.returncode != 0 and "no qcache store" in missing.stderr and "Traceback" not in missing.stderr
    )


# -- HTTP: a plain file server, read-only, with every request logged ----------------------------------


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        self.requests.append(self.path)
        return super().send_head()


@pytest.fixture
def http_url(local) -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = functools.partial(
        type("Handler", (_LoggingHandler,), {"requests": seen}), directory=str(local.parent)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{local.name}", seen
    finally:
        server.shutdown()


def test_http_store_is_read_lazily_chunk_by_chunk(local, http_url):
    url, seen = http_url
    remote, here = open_store(url), open_store(local)
    key = here.runs()[0]
    seen.clear()
    got = remote.run(key).activations(1).compute()
    np.testing.assert_array_equal(got, here.run(key).activations(1).compute())
    chunk_requests = [p for p in seen if "/c/" in p and "/layers/" in p]  # (plus the token layout's)
    assert chunk_requests and all("/L001/" in p for p in chunk_requests), "read another layer's chunks"
    assert not any("/L003/" in p for p in seen)
    assert _qcache("sql", "SELECT count(*) AS n FROM predictions", "--store", url).returncode == 0


def test_http_store_is_read_only_and_analyzes_into_local_results(local, http_url, tmp_path):
    url, _ = http_url
    refused = _qcache("analyze", "dead", "--store", url)
    assert refused.returncode != 0 and "--results" in refused.stderr and "Traceback" not in refused.stderr
    out = tmp_path / "results"
    done = _qcache("analyze", "dead", "--store", url, "--results", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "tables" / "neuron_stats").is_dir() and not (local / "tables" / "neuron_stats").exists()
    run_dead(AnalyzeConfig(store=open_store(local, results=tmp_path / "here")), **QUIET)
    answer = _qcache("sql", DEAD_SQL, "--store", url, "--results", str(out), "--format", "json")
    assert answer.returncode == 0, answer.stderr
    cols, rows = run_sql(tmp_path / "here", DEAD_SQL)
    assert json.loads(answer.stdout) == [dict(zip(cols, r, strict=True)) for r in rows]


# -- failures of remote stores: one StoreError line, never a filesystem's traceback -------------------------


def test_unreachable_or_unreadable_remote_stores_are_one_line(http_url, tmp_path):
    import os

    import qcache

    url, _ = http_url
    no_aws = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # (no credentials at all)
    no_aws.update(
        {
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # never reached: signing fails first
        }
    )
    # the plain file server ignores Range: with 64-byte blocks, reading a Parquet footer needs one
    no_range = {**os.environ, "QCACHE_STORAGE_OPTIONS": '{"block_size": 64}'}
    cases = [
        (["ls", "--store", "s3://no-such-bucket-xyz/q"], no_aws, "NoCredentialsError"),
        (
            ["ls", "--store", "ftp://no-such-host.invalid/x"],
            os.environ,
            "cannot open ftp://no-such-host.invalid/x",
        ),
        (["sql", "SELECT count(*) FROM predictions", "--store", url], no_range, "does not answer Range"),
    ]
    for args, env, words in cases:
        res = subprocess.run(as_process(args), capture_output=True, text=True, env=env, timeout=300)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot"), res.stderr
        assert words in lines[0] and "check the URL" in lines[0] and "Traceback" not in res.stderr, lines[0]
    with pytest.raises(qcache.errors.StoreError, match="cannot open ftp://"):
        qcache.open("ftp://no-such-host.invalid/x")
