"""Exact neuron redundancy: qcache's blockwise pass over a Zarr store vs numpy.corrcoef vs the float32 Gram.

Writes synthetic float16 activations (SiLU of a low-rank pre-activation plus noise, with dead, duplicated
and outlier neurons) through the real store writer, then runs each contender in its own subprocess and
reads its peak RSS (``resource.getrusage``, which sees BLAS and numpy buffers that tracemalloc misses):

* qcache: ``correlation_counts`` on the store array (decompression and widening included);
* numpy: ``numpy.corrcoef`` on the same array already in memory (then the max |r| difference to qcache);
* gram: ``X.T @ X`` on the array in memory as float32 (this machine's rate for the same product).

    python benchmarks/redundancy.py --quick      # D = 2048, N = 16384
    python benchmarks/redundancy.py              # D = 11008, N = 65536 (minutes, ~7 GB for numpy)
    python benchmarks/redundancy.py --neurons 6144 --rounds 3 --before /tmp/old   # against another qcache
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np

from qcache import store
from qcache.store import ArraySpec, RunKey, RunSpec, RunWriter, TokenLayout

RUN = "boolq/synth/fp16"
LAYER = 1


def synthetic_layer(n: int, d: int, seed: int = 0, rows: int = 4096) -> np.ndarray:
    """(n, d) float16 SiLU activations with realistic statistics, built ``rows`` at a time."""
    rng = np.random.default_rng(seed)
    k = 64
    w = rng.standard_normal((k, d)).astype(np.float32) * rng.uniform(0.05, 0.6, d).astype(np.float32)
    bias = rng.normal(-0.5, 0.8, d).astype(np.float32)
    bias[rng.choice(d, d // 50, replace=False)] = -12.0  # dead: |silu| <= 1e-4 everywhere
    scale = np.ones(d, np.float32)
    scale[rng.choice(d, max(1, d // 500), replace=False)] = 40.0  # a few outlier neurons
    dup = rng.choice(d, 2 * (d // 100), replace=False).reshape(2, -1)  # near-duplicate pairs
    out = np.empty((n, d), np.float16)
    for r0 in range(0, n, rows):
        m = min(rows, n - r0)
        z = rng.standard_normal((m, k)).astype(np.float32) @ w + bias
        z += rng.standard_normal((m, d), dtype=np.float32) * 0.7
        z[:, dup[1]] = z[:, dup[0]] + 0.05 * rng.standard_normal((m, dup.shape[1]), dtype=np.float32)
        out[r0 : r0 + m] = (scale * z / (1.0 + np.exp(-z))).astype(np.float16)
    return out


def write_store(root: Path, x: np.ndarray, chunk_rows: int = 1024, quant: str = "fp16") -> None:
    """Write ``x`` as layer 1 of run boolq/synth/``quant`` through the store writer (one example per 256
    tokens)."""
    n, d = x.shape
    lengths = np.full(n // 256, 256)
    layout = TokenLayout(lengths=lengths, chunk_rows=chunk_rows)
    e = layout.n_examples
    manifest = {
        "model": "synth", "model_source": "synth", "quant": quant, "quant_config": {"quant": quant},
        "dtype": "float16", "layers": [LAYER], "taps": ["act"], "attributions": None, "activation": "silu",
        "n_neurons": d, "dataset": {"name": "boolq", "labels": ["False", "True"]}, "max_length": 512,
        "chunk_rows": chunk_rows, "n_examples": e, "n_tokens": layout.n_tokens,
    }  # fmt: skip
    name = f"layers/L{LAYER:03d}/activations"
    spec = RunSpec(
        key=RunKey("boolq", "synth", quant),
        manifest=manifest,
        layout=layout,
        token_ids=np.zeros(layout.n_tokens, np.int32),
        gold=np.zeros(e, np.int16),
        n_truncated=np.zeros(e, np.int32),
        arrays=(ArraySpec(name, d, "float16"),),
    )
    w = RunWriter.open(store.open(root, create=not (root / "zarr.json").exists()), spec)
    probs = np.full((e, 2), 0.5, np.float32)
    for u in range(layout.n_units):
        r0, r1 = layout.unit_rows(u)
        own = np.flatnonzero(layout.owner_units == u)
        k = len(own)
        cols = {
            "example_id": own.astype(np.int32), "gold": np.zeros(k, np.int16), "label_prob": probs[own],
            "label_prob_norm": probs[own], "pred_label": np.zeros(k, np.int16),
            "confidence": np.full(k, 0.5, np.float32), "correct": np.ones(k, bool),
            "top_token_id": np.zeros(k, np.int32), "top_token": np.array(["x"] * k, dtype=object),
            "top_token_prob": np.full(k, 0.5, np.float32), "correct_vocab": np.ones(k, bool),
        }  # fmt: skip
        w.write_unit(u, {name: x[r0:r1]}, cols)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu() -> float:
    """CPU seconds of this process, every thread (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _activations(root: Path, rows: int) -> da.Array:
    return store.open(root).run(RUN).activations(LAYER)[:rows]


def worker(kind: str, root: Path, rows: int, repeat: int, block: int, scheduler: str | None) -> dict:
    """One contender, in this process; returns min seconds, peak RSS and results."""
    from qcache.analyze.redundancy import EDGES, correlation_blocks, correlation_counts
    from qcache.analyze.scheduler import scheduler as dask_scheduler

    x = _activations(root, rows)
    times, out = [], {}
    if kind == "qcache":  # a first small call: one-time costs (imports, numba's cache) stay out of the timing
        correlation_counts(x[: min(rows, 512), : min(x.shape[1], 64)])
        with dask_scheduler(scheduler):
            for _ in range(repeat):
                t, c0 = time.perf_counter(), _cpu()
                c = correlation_counts(x, block=block)
                times.append((time.perf_counter() - t, _cpu() - c0))
        out = {"bins": c.bins.tolist(), "above": c.above, "n_pairs": c.n_pairs, "n_constant": c.n_constant}
    elif kind == "numpy":
        xm = x.compute()  # (N, D) float16 in memory, not timed
        for _ in range(repeat):
            t, c0 = time.perf_counter(), _cpu()
            ref = np.corrcoef(xm, rowvar=False)
            times.append((time.perf_counter() - t, _cpu() - c0))
        out["peak_mb"] = _peak_mb()
        del xm
        ok = np.isfinite(np.diag(ref))
        tri = np.abs(ref[np.ix_(ok, ok)][np.triu_indices(int(ok.sum()), 1)])
        out["bins"] = np.histogram(np.minimum(tri, 1.0), bins=EDGES)[0].tolist()
        out["above"] = int((tri >= 0.8).sum())
        del tri
        diff = 0.0
        with dask_scheduler(scheduler):
            for si, sj, r in correlation_blocks(x, block=block):
                fin = np.isfinite(ref[si, sj])
                if fin.any():
                    diff = max(diff, float(np.abs(r[fin] - ref[si, sj][fin]).max()))
        out["max_abs_diff"] = diff
    elif kind == "gram":
        xm = x.compute().astype(np.float32)
        for _ in range(repeat):
            t, c0 = time.perf_counter(), _cpu()
            xm.T @ xm  # numpy recognizes the transpose of one buffer: symmetric rank-k update
            times.append((time.perf_counter() - t, _cpu() - c0))
    out.setdefault("peak_mb", _peak_mb())
    return {"seconds": min(w for w, _ in times), "cpu": min(c for _, c in times), **out}


def _spawn(kind: str, args: argparse.Namespace, root: Path, rows: int, package: Path | None = None) -> dict:
    """One contender in its own process; ``package``: a directory holding another ``qcache`` to time."""
    cmd = [sys.executable, __file__, "--worker", kind, "--store", str(root), "--rows", str(rows)]
    cmd += ["--repeat", str(args.repeat), "--block", str(args.block)]
    cmd += ["--scheduler", args.scheduler] if args.scheduler else []
    env = {**os.environ, **({"PYTHONPATH": str(package)} if package else {}), **_threads(args)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"{kind} contender failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _threads(args: argparse.Namespace) -> dict[str, str]:
    """``--blas-threads K``: BLAS limited to K threads in every contender (with K = 1, CPU seconds measure
    the work, nearly free of other processes' load: no BLAS thread waits for a descheduled one)."""
    if not args.blas_threads:
        return {}
    k = str(args.blas_threads)
    return {"OPENBLAS_NUM_THREADS": k, "OMP_NUM_THREADS": k, "MKL_NUM_THREADS": k}


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="D = 2048, N = 16384")
    ap.add_argument("--neurons", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats per contender (min reported)")
    ap.add_argument(
        "--rounds", type=int, default=1, help="processes per contender, interleaved (min reported)"
    )
    ap.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a directory holding another qcache package (e.g. `git archive REV | tar -x -C DIR/qcache`), "
        "timed in the same rounds",
    )
    ap.add_argument("--block", type=int, default=2048, help="qcache column block")
    ap.add_argument("--blas-threads", type=int, default=None, help="BLAS threads (default: one per core)")
    ap.add_argument("--scheduler", default=None, help="qcache's Dask scheduler (default: threads)")
    ap.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--worker", choices=["qcache", "numpy", "gram", "write"], default=None, help=argparse.SUPPRESS
    )
    ap.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "write":  # in a child: a parent's peak RSS is inherited by the processes it starts
        write_store(args.store, synthetic_layer(args.rows, args.neurons))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.store, args.rows, args.repeat, args.block, args.scheduler)))
        return
    d = args.neurons or (2048 if args.quick else 11008)
    n = args.tokens or (16384 if args.quick else 65536)
    args.repeat = args.repeat or (3 if args.quick else 1)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="qcache-bench-") as tmp:
        root = Path(tmp) / "store"
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", "write", "--store", str(root), "--rows", str(n)]
        subprocess.run([*cmd, "--neurons", str(d)], check=True)
        print(f"D = {d} neurons, N = {n} tokens, float16 store written in {time.perf_counter() - t:.1f} s")
        print(
            f"min of {args.repeat} run(s) in each of {args.rounds} round(s); block {args.block}; "
            "each contender in its own process"
        )
        for _ in range(args.rounds):
            runs.setdefault("q", []).append(_spawn("qcache", args, root, n))
            runs.setdefault("q_half", []).append(_spawn("qcache", args, root, n // 2))
            if args.before:
                runs.setdefault("before", []).append(_spawn("qcache", args, root, n, args.before.resolve()))
            runs.setdefault("gram", []).append(_spawn("gram", args, root, n))
        npy = _spawn("numpy", args, root, n)
    q, q_half, gram = _best(runs["q"]), _best(runs["q_half"]), _best(runs["gram"])
    flops = 2.0 * n * d * d  # the full Gram product, as GEMM would count it
    print(f"{'contender':<34} {'wall s':>8} {'CPU s':>8} {'eff. GFLOP/s':>13} {'peak RSS MB':>12}")
    rows = [
        (f"qcache from the store (N = {n})", q, flops),
        (f"qcache from the store (N = {n // 2})", q_half, flops / 2),
    ]
    if args.before:
        rows.append((f"qcache before (N = {n})", _best(runs["before"]), flops))
    rows += [("numpy.corrcoef in memory", npy, flops), ("numpy X.T @ X float32 in memory", gram, flops)]
    for name, r, f in rows:
        line = f"{name:<34} {r['seconds']:>8.2f} {r['cpu']:>8.2f} {f / r['seconds'] / 1e9:>13.1f}"
        print(f"{line} {r['peak_mb']:>12.0f}")
    same = q["bins"] == npy["bins"] and q["above"] == npy["above"]
    print(f"qcache / numpy.corrcoef time: {q['seconds'] / npy['seconds']:.2f}  (target <= 1)")
    print(f"qcache / float32 Gram time:   {q['seconds'] / gram['seconds']:.2f}  (target <= 1.2)")
    print(f"qcache / float32 Gram CPU:    {q['cpu'] / gram['cpu']:.2f}")
    if args.before:
        before = _best(runs["before"])
        print(f"before / float32 Gram time:   {before['seconds'] / gram['seconds']:.2f}")
        print(f"before / float32 Gram CPU:    {before['cpu'] / gram['cpu']:.2f}")
        equal = before["bins"] == q["bins"] and before["above"] == q["above"]
        print(f"before's counts equal:        {equal}")
    print(f"max |r_qcache - r_numpy|:     {npy['max_abs_diff']:.2e}  (target < 1e-5)")
    print(f"histogram and pairs >= 0.8 equal to numpy's: {same}  ({q['above']} of {q['n_pairs']} pairs)")
    print(f"qcache peak RSS at N and N/2: {q['peak_mb']:.0f} MB, {q_half['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
