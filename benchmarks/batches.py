"""Training batches: shuffled ``Run.batches`` against a plain sequential read of the same chunks.

Writes synthetic float16 activations (redundancy.py's SiLU layer: they compress about like real ones)
through the real store writer into a temporary directory, then times one epoch of
``(batch_tokens, neurons)`` batches per contender, each consuming every batch:

* sequential (the baseline): the chunks in store order, each read whole (one file read and one Blosc
  decompression per chunk, ``store.chunks``) and copied into its batch, on this thread, as a plain
  training loop over the store would;
* zarr sequential: ``array[r0:r0 + batch_tokens]`` through zarr itself, for reference;
* qcache in order: ``run.batches(..., shuffle=False)``, the same pools and read-ahead threads, no permutation;
* qcache shuffled: ``run.batches(...)``, the default: chunks in a random order, rows permuted across a pool.

GB/s counts the array's bytes (tokens x neurons x 2). Ratios are against the baseline of the same run.

    python benchmarks/batches.py --small     # 16384 x 2048 (64 MB)
    python benchmarks/batches.py             # 65536 x 4096 (512 MB)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from redundancy import LAYER, RUN, synthetic_layer, write_store

from qcache import store
from qcache.store.chunks import direct_chunks

TARGET = 0.8  # shuffled throughput / sequential throughput


def sequential(path: Path, batch: int) -> Iterator[np.ndarray]:
    """The baseline: whole chunks in store order, each copied into the batch it belongs to."""
    z = zarr.open_array(str(path), mode="r")
    src = direct_chunks(z, path)
    assert src is not None, "the benchmark store must have qcache's chunk layout"
    (n, d), (rows, width) = z.shape, z.chunks
    for r0 in range(0, n, batch):
        r1 = min(r0 + batch, n)
        out = np.empty((r1 - r0, d), dtype=z.dtype)
        for c in range(r0 // rows, -(-r1 // rows)):  # batch_tokens is a multiple of chunk_rows here
            for j in range(-(-d // width)):
                block = src.read_chunk((c, j))
                out[c * rows - r0 : c * rows - r0 + len(block), j * width : j * width + block.shape[1]] = (
                    block
                )
        yield out


def zarr_sequential(path: Path, batch: int) -> Iterator[np.ndarray]:
    z = zarr.open_array(str(path), mode="r")
    for r0 in range(0, z.shape[0], batch):
        yield np.asarray(z[r0 : r0 + batch])


def epoch(make: Callable[[], Iterator[np.ndarray]]) -> tuple[float, float, int, float]:
    """Wall seconds and CPU seconds (all threads) for one epoch, batches seen, and a float64 sum over the
    first columns of every row (the same rows give the same sum up to rounding, whatever their order)."""
    wall, cpu = time.perf_counter(), time.process_time()
    count, total = 0, 0.0
    for x in make():
        count += 1
        total += float(x[:, :8].sum(dtype=np.float64))  # touch each batch; summing all of it would dominate
    return time.perf_counter() - wall, time.process_time() - cpu, count, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="16384 tokens x 2048 neurons")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--neurons", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3, help="timed epochs per contender (min reported)")
    args = ap.parse_args()
    n = args.tokens or (16384 if args.small else 65536)
    d = args.neurons or (2048 if args.small else 4096)
    b = args.batch_tokens
    with tempfile.TemporaryDirectory(prefix="qcache-bench-") as tmp:
        root = Path(tmp) / "store"
        write_store(root, synthetic_layer(n, d))
        run = store.open(root).run(RUN)
        path = root / "runs" / RUN / f"layers/L{LAYER:03d}/activations"
        contenders: dict[str, Callable[[], Iterator[np.ndarray]]] = {
            "sequential (baseline)": lambda: sequential(path, b),
            "zarr sequential": lambda: zarr_sequential(path, b),
            "qcache, in order": lambda: run.batches(LAYER, batch_tokens=b, shuffle=False),
            "qcache, shuffled": lambda: run.batches(LAYER, batch_tokens=b, seed=0),
        }
        best: dict[str, list[float]] = {}  # min wall s, min CPU s, batches, checksum
        for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every contender
            for name, make in contenders.items():
                wall, cpu, count, total = epoch(make)
                old = best.setdefault(name, [wall, cpu, count, total])
                old[0], old[1] = min(old[0], wall), min(old[1], cpu)
    gb = n * d * 2 / 1e9
    base, base_cpu = best["sequential (baseline)"][:2]
    print(
        f"{n} tokens x {d} neurons float16 ({gb * 1e3:.0f} MB), batches of {b}, min of {args.repeat} epochs"
    )
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (CPU s: all threads)")
    head = ("contender", "wall s", "batches/s", "GB/s", "vs base", "CPU s", "vs base")
    print("{:<26} {:>7} {:>9} {:>5} {:>7} {:>6} {:>7}".format(*head))
    for name, (w, c, k, _) in best.items():
        print(
            f"{name:<26} {w:>7.3f} {k / w:>9.1f} {gb / w:>5.2f} {base / w:>7.2f} "
            f"{c:>6.3f} {base_cpu / c:>7.2f}"
        )
    sums = np.array([v[3] for v in best.values()])
    same = bool(np.allclose(sums, sums[0], rtol=1e-9))
    ratio = base / best["qcache, shuffled"][0]
    print(f"shuffled / sequential throughput: {ratio:.2f} (target >= {TARGET}: {ratio >= TARGET}); "
          f"same rows in every contender: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
