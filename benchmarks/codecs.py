"""Which compressor for cached activations: ratio and speed of candidate codecs on real activations.

Reads a run's activations (default: the demo store) and times each codec's encode and decode of whole
chunks, single-threaded, as zarr does per chunk.

    python benchmarks/codecs.py --store ./qcache-store --run boolq/smollm2-135m/int8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numcodecs import LZ4, Blosc, Zstd

from qcache import store

CANDIDATES = {
    "none": None,
    "lz4": LZ4(),
    "zstd-1": Zstd(level=1),
    "blosc-lz4-shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
    "blosc-lz4-bitshuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE),
    "blosc-zstd1-shuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE),
    "blosc-zstd1-bitshuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE),
    "blosc-zstd3-bitshuffle": Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="qcache-store")
    ap.add_argument("--run", default=None, help="DATASET/MODEL/QUANT (default: the first run)")
    ap.add_argument("--rows", type=int, default=1024)
    args = ap.parse_args()
    Blosc.use_threads = False
    s = store.open(args.store)
    run = s.run(args.run or s.runs()[0])
    chunks = []
    for layer in run.layers:
        a = run.activations(layer)[: 4 * args.rows].compute()
        chunks += [np.ascontiguousarray(a[i : i + args.rows]) for i in range(0, len(a), args.rows)]
    raw = sum(c.nbytes for c in chunks)
    shape = f"({args.rows}, {chunks[0].shape[1]}) {chunks[0].dtype}"
    print(f"{run.key}: {len(chunks)} chunks of {shape}, {raw / 2**20:.1f} MiB")
    print(f"{'codec':<24} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9}")
    for name, codec in CANDIDATES.items():
        if codec is None:
            print(f"{name:<24} {1.0:>6.2f} {'-':>9} {'-':>9}")
            continue
        t0 = time.perf_counter()
        enc = [codec.encode(c) for c in chunks]
        t1 = time.perf_counter()
        for e, c in zip(enc, chunks, strict=True):
            np.frombuffer(codec.decode(e), dtype=c.dtype)
        t2 = time.perf_counter()
        size = sum(len(e) for e in enc)
        print(f"{name:<24} {raw / size:>6.2f} {raw / 1e6 / (t1 - t0):>9.0f} {raw / 1e6 / (t2 - t1):>9.0f}")


if __name__ == "__main__":
    main()
