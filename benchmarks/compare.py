"""Linear CKA out of core: qcache's blockwise Grams over a Zarr store vs the float32 cross-Gram in memory.

Writes two float16 runs of one synthetic layer (a baseline, and a "method" = baseline plus noise) through
the real store writer, then runs each contender in its own process and reads its peak RSS:

* cka: ``linear_cka`` on the two store arrays (three Grams: X^T Y, X^T X, Y^T Y; reads, decompression,
  widening and the column means included);
* cka, baseline cached: the same with the baseline's own Gram reused (``x_terms``), the per-method cost
  of ``qcache compare`` once the baseline's layer is done (X^T Y and Y^T Y);
* cka, both recorded: both sides' own Gram norms already in the ``gram_terms`` table (left by ``qcache
  analyze redundancy``, or an earlier compare), the per-method cost of ``qcache compare`` after ``analyze
  all``: X^T Y and the column means;
* cka at N/2: the peak memory must not grow with N;
* gemm: ``X.T @ Y`` as float32 on both arrays already in memory (this machine's rate for the cross-Gram).

The full CKA needs twice the cross-Gram's products (X^T X and Y^T Y by rank-k updates, half a GEMM each),
so its floor is about 2x the GEMM; with the baseline cached, 1.5x; with both recorded, 1x.

    python benchmarks/compare.py                 # D = 11008, N = 65536 (many minutes on two cores)
    python benchmarks/compare.py --small         # D = 2048, N = 16384
    python benchmarks/compare.py --scale 4       # D and N divided by 4: D = 2752, N = 16384
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

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from redundancy import LAYER, _cpu, _threads, synthetic_layer, write_store

from qcache import store

BASE, METHOD = "boolq/synth/fp16", "boolq/synth/int8"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(kind: str, root: Path, rows: int, repeat: int, memory_limit: int | None) -> dict:
    """One contender, in this process: min seconds, peak RSS and the value."""
    from qcache.analyze.cka import linear_cka, recorded_terms, self_terms

    s = store.open(root)
    x = s.run(BASE).activations(LAYER)[:rows]
    y = s.run(METHOD).activations(LAYER)[:rows]
    times, out = [], {}
    if kind in ("cka", "cached", "recorded"):
        linear_cka(x[:512, :64], y[:512, :64])  # one-time costs (imports, numba's cache) out of the timing
        terms = self_terms(x, memory_limit=memory_limit) if kind != "cka" else None
        # what the gram_terms table holds: the squared norm only (the means are recomputed in the timing)
        y_sq = self_terms(y, memory_limit=memory_limit).gram_sq if kind == "recorded" else None
        for _ in range(repeat):
            t, c0 = time.perf_counter(), _cpu()
            x_terms = recorded_terms(x, terms.gram_sq, "float32") if kind == "recorded" else terms
            y_terms = recorded_terms(y, y_sq, "float32") if y_sq is not None else None
            res = linear_cka(x, y, x_terms=x_terms, y_terms=y_terms, memory_limit=memory_limit)
            times.append((time.perf_counter() - t, _cpu() - c0))
        out["cka"] = res.cka
    elif kind == "gemm":
        xm, ym = x.compute().astype(np.float32), y.compute().astype(np.float32)
        for _ in range(repeat):
            t, c0 = time.perf_counter(), _cpu()
            xm.T @ ym
            times.append((time.perf_counter() - t, _cpu() - c0))
    elif kind == "numpy":  # the reference value: float64 in memory, not timed against anything
        xm, ym = x.compute().astype(np.float64), y.compute().astype(np.float64)
        xm -= xm.mean(0)
        ym -= ym.mean(0)
        out["cka"] = float(
            np.linalg.norm(ym.T @ xm) ** 2 / (np.linalg.norm(xm.T @ xm) * np.linalg.norm(ym.T @ ym))
        )
        times.append((0.0, 0.0))
    return {
        "seconds": min(w for w, _ in times),
        "cpu": min(c for _, c in times),
        "peak_mb": _peak_mb(),
        **out,
    }


def write_runs(root: Path, n: int, d: int) -> None:
    """The baseline (synthetic SiLU activations) and the method: the baseline plus 5% relative noise."""
    x = synthetic_layer(n, d)
    write_store(root, x, quant="fp16")
    noise = np.random.default_rng(1).standard_normal(x.shape, dtype=np.float32) * 0.05
    write_store(root, (x + noise * np.abs(x)).astype(np.float16), quant="int8")


def _spawn(kind: str, args: argparse.Namespace, root: Path, rows: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--store", str(root), "--rows", str(rows)]
    cmd += ["--repeat", str(args.repeat)]
    cmd += ["--memory-limit", str(args.memory_limit)] if args.memory_limit else []
    env = {**os.environ, **_threads(args)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"{kind} contender failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="D = 2048, N = 16384")
    ap.add_argument("--scale", type=int, default=1, help="divide the full D and N by this")
    ap.add_argument("--neurons", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="timed repeats per process (min reported)")
    ap.add_argument("--rounds", type=int, default=1, help="processes per contender, interleaved (min)")
    ap.add_argument("--memory-limit", type=int, default=None, help="bytes for qcache (default 4 GiB)")
    ap.add_argument("--blas-threads", type=int, default=None, help="BLAS threads (default: one per core)")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 in-memory reference value")
    ap.add_argument(
        "--only",
        default="cka,cached,recorded,half",
        help="qcache contenders to time, comma-separated (the GEMM baseline always runs)",
    )
    ap.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "write":  # in a child: a parent's peak RSS is inherited by the processes it starts
        write_runs(args.store, args.rows, args.neurons)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.store, args.rows, args.repeat, args.memory_limit)))
        return
    d = args.neurons or (2048 if args.small else 11008 // args.scale)
    n = args.tokens or (16384 if args.small else 65536 // args.scale)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="qcache-bench-") as tmp:
        root = Path(tmp) / "store"
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", "write", "--store", str(root), "--rows", str(n)]
        subprocess.run([*cmd, "--neurons", str(d)], check=True)
        print(f"D = {d} neurons, N = {n} tokens, two float16 runs written in {time.perf_counter() - t:.1f} s")
        print(f"min of {args.repeat} run(s) in each of {args.rounds} round(s), one process per contender")
        for _ in range(args.rounds):
            contenders = (("cka", "cka", n), ("cached", "cached", n), ("recorded", "recorded", n))
            for name, kind, rows in (*contenders, ("half", "cka", n // 2)):
                if name in args.only.split(","):
                    runs.setdefault(name, []).append(_spawn(kind, args, root, rows))
            runs.setdefault("gemm", []).append(_spawn("gemm", args, root, n))
        ref = None if args.no_check else _spawn("numpy", args, root, n)
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    flops = 2.0 * n * d * d  # the cross-Gram product X^T Y
    print(f"{'contender':<40} {'wall s':>8} {'CPU s':>8} {'GEMM-equiv GFLOP/s':>19} {'peak RSS MB':>12}")
    rows = [
        (f"qcache CKA from the store (N = {n})", best.get("cka"), flops),
        (f"qcache CKA, baseline cached (N = {n})", best.get("cached"), flops),
        (f"qcache CKA, both recorded (N = {n})", best.get("recorded"), flops),
        (f"qcache CKA from the store (N = {n // 2})", best.get("half"), flops / 2),
        ("numpy X.T @ Y float32 in memory", best["gemm"], flops),
    ]
    for name, r, f in [row for row in rows if row[1] is not None]:
        line = f"{name:<40} {r['seconds']:>8.2f} {r['cpu']:>8.2f} {f / r['seconds'] / 1e9:>19.1f}"
        print(f"{line} {r['peak_mb']:>12.0f}")
    g, gc = best["gemm"]["seconds"], best["gemm"]["cpu"]
    for label, r, floor in (
        ("CKA", best.get("cka"), 2),
        ("CKA with the baseline cached", best.get("cached"), 1.5),
        ("CKA with both Gram norms recorded", best.get("recorded"), 1),
    ):
        if r is None:
            continue
        ratios = f"time {r['seconds'] / g:.2f}, CPU {r['cpu'] / gc:.2f}"
        print(f"{label + ' / float32 cross-Gram:':<48} {ratios}  (floor ~{floor})")
    if "cka" in best and "half" in best:
        peaks = f"{best['cka']['peak_mb']:.0f} MB, {best['half']['peak_mb']:.0f} MB"
        print(f"qcache peak RSS at N and N/2: {peaks}")
    for name in ("cka", "cached", "recorded"):
        if ref is not None and name in best:
            diff = abs(best[name]["cka"] - ref["cka"])
            value = f"CKA ({name}) {best[name]['cka']:.9f}; float64 in memory {ref['cka']:.9f}"
            print(f"{value}; |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
