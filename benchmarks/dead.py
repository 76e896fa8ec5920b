"""Dead-neuron scan throughput: ``neuron_stats`` over a compressed float16 store vs plain numpy in memory.

GB/s counts the float16 bytes of the activations (tokens x neurons x 2), the same for both contenders:

* qcache: ``neuron_stats`` on the store array (Blosc decompression, min/max/mean/std/near-zero/dead);
* numpy: ``min``, ``max``, ``mean``, ``std`` (float64) and ``|x| <= 0.1`` counts on the array in memory.

    python benchmarks/dead.py --quick      # 16384 x 4096 (128 MB)
    python benchmarks/dead.py              # 65536 x 4096 (512 MB)
    python benchmarks/dead.py --real qcache-store   # a real run's activations, tiled to that size

The synthetic activations hardly compress (their mantissas are noise), so Blosc's decoding is cheap; real
SmolLM2 activations compress about 1.5x and cost more to decode: ``--real`` measures that case.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from redundancy import RUN, synthetic_layer, write_store

from qcache import store
from qcache.analyze.dead import DeadRule, neuron_stats
from qcache.analyze.scheduler import scheduler


def numpy_pass(x: np.ndarray, bound: float) -> tuple[np.ndarray, ...]:
    """The same statistics with plain numpy on (tokens, neurons) ``x`` in memory."""
    return (
        x.min(axis=0),
        x.max(axis=0),
        x.mean(axis=0, dtype=np.float64),
        x.std(axis=0, dtype=np.float64),
        (np.abs(x) <= bound).sum(axis=0),
    )


def real_layer(path: str, n: int, d: int) -> np.ndarray:
    """(n, d) float16 from a real run: its layers side by side, cut to ``d`` neurons, rows tiled to ``n``."""
    st = store.open(path)
    runs = st.runs()
    if not runs:
        raise SystemExit(f"{path}: no runs; extract one first (see the README)")
    run = st.run(runs[0])
    layers = [run.activations(layer).compute() for layer in run.manifest["layers"]]
    x = np.concatenate(layers, axis=1)[:, :d].astype(np.float16)
    if x.shape[1] < d:
        raise SystemExit(f"{path}: {runs[0]} has {x.shape[1]} neurons; pass --neurons {x.shape[1]}")
    print(f"real activations: {runs[0]}, {x.shape[0]} tokens tiled to {n}")
    return np.tile(x, (-(-n // len(x)), 1))[:n].copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16384 tokens x 4096 neurons")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--neurons", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats (min reported)")
    ap.add_argument("--scheduler", default=None, help="Dask scheduler for qcache (default: threads)")
    ap.add_argument("--real", default=None, help="store whose first run's activations to tile instead")
    args = ap.parse_args()
    n = args.tokens or (16384 if args.quick else 65536)
    with tempfile.TemporaryDirectory(prefix="qcache-bench-") as tmp:
        root = Path(tmp) / "store"
        xm = real_layer(args.real, n, args.neurons) if args.real else synthetic_layer(n, args.neurons)
        write_store(root, xm)
        x = store.open(root).run(RUN).activations(1)
        gb = xm.nbytes / 1e9
        q_times, n_times = [], []
        with scheduler(args.scheduler):
            for _ in range(args.repeat):
                t = time.perf_counter()
                st = neuron_stats(x, "silu", DeadRule())
                q_times.append(time.perf_counter() - t)
        for _ in range(args.repeat):
            t = time.perf_counter()
            ref = numpy_pass(xm, 0.1)
            n_times.append(time.perf_counter() - t)
        ok = (
            np.array_equal(st.minimum, ref[0].astype(np.float64))
            and np.array_equal(st.maximum, ref[1].astype(np.float64))
            and np.allclose(st.mean, ref[2], rtol=1e-6, atol=1e-9)
            and np.allclose(st.std, ref[3], rtol=1e-6, atol=1e-9)
            and np.array_equal(st.frac_near_zero * n, ref[4])
        )
    cores = os.cpu_count()
    size = f"{n} tokens x {args.neurons} neurons float16 ({gb * 1e3:.0f} MB)"
    print(f"{size}, min of {args.repeat}, {cores} cores")
    print(f"{'contender':<40} {'s':>7} {'GB/s':>7}")
    print(f"{'qcache neuron_stats from the store':<40} {min(q_times):>7.3f} {gb / min(q_times):>7.2f}")
    print(f"{'plain numpy pass in memory':<40} {min(n_times):>7.3f} {gb / min(n_times):>7.2f}")
    print(
        f"qcache / numpy throughput: {min(n_times) / min(q_times):.2f}; target >= 1 GB/s: "
        f"{gb / min(q_times) >= 1.0}; equal to numpy: {ok}; dead neurons: {int(st.dead.sum())}"
    )


if __name__ == "__main__":
    main()
