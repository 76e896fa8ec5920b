"""The store writer alone: how many activation bytes per second one writer thread commits.

Extraction writes each unit on one background thread while the next unit computes (extract/run/runner.py).
On a GPU a 7B model with ``--layers all`` produces more than 1 GB/s of float16 activations; if the writer
commits less, it is the limit. This times ``RunWriter.write_unit`` on SiLU-of-normal float16 blocks (they
compress like real activations, unlike uniform noise), and its parts: zarr's encode-and-store, the crc32 of
each block, the fsync of the unit's chunk files.

    python -m benchmarks.writer_rate [--layers 8] [--neurons 11008] [--units 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

TARGET = 1e9  # bytes/s: a 7B model's activations with --layers all at GPU extraction rates


def _spec(layers: int, neurons: int, units: int, chunk_rows: int) -> Any:
    from qcache.store import ArraySpec, RunKey, RunSpec, TokenLayout

    lengths = np.full(units * chunk_rows // 32, 32, dtype=np.int32)  # examples of 32 tokens
    layout = TokenLayout(lengths=lengths, chunk_rows=chunk_rows)
    arrays = tuple(
        ArraySpec(f"layers/L{n:03d}/activations", neurons, "float16") for n in range(1, layers + 1)
    )
    manifest = {"model": "writer-bench", "layers": list(range(1, layers + 1)), "n_neurons": neurons}
    return RunSpec(
        RunKey("bench", "writer-bench", "fp16"),
        manifest,
        layout,
        np.zeros(layout.n_tokens, np.int32),
        np.zeros(layout.n_examples, np.int16),
        np.zeros(layout.n_examples, np.int32),
        arrays,
    )


def measure(
    work: Path,
    *,
    layers: int,
    neurons: int,
    units: int,
    chunk_rows: int = 1024,
    in_flight: tuple[int, ...] = (1, 2, 4),
) -> dict[str, Any]:
    """Bytes/s of ``write_unit`` over ``units`` units of ``layers`` float16 ``(chunk_rows, neurons)`` blocks,
    with ``k`` units written at once (``k`` writer threads) for each ``k`` of ``in_flight``."""
    from qcache.store import RunWriter, open_store

    rng = np.random.default_rng(0)
    x = rng.standard_normal((chunk_rows, neurons), dtype=np.float32)
    block = (x / (1 + np.exp(-x))).astype(np.float16)  # SiLU of N(0, 1)
    spec = _spec(layers, neurons, units, chunk_rows)
    blocks = {a.path: block for a in spec.arrays}
    preds = {"example_id": np.zeros(0, np.int32)}
    unit_bytes = layers * block.nbytes
    rates: dict[int, float] = {}
    stored = 0
    for k in in_flight:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            writer = RunWriter.open(open_store(Path(tmp) / "s", create=True), spec)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=k) as pool:
                list(pool.map(lambda u, w=writer: w.write_unit(u, blocks, preds), range(units)))
            rates[k] = units * unit_bytes / (time.perf_counter() - t0)
            stored = sum(f.stat().st_size for f in (Path(tmp) / "s" / "runs").rglob("c/*/*") if f.is_file())
    t0 = time.perf_counter()
    for _ in range(layers):
        zlib.crc32(np.ascontiguousarray(block).tobytes())
    crc_s = time.perf_counter() - t0
    return {
        "layers": layers,
        "neurons": neurons,
        "units": units,
        "unit_bytes": unit_bytes,
        "in_flight_bytes_per_s": rates,
        "bytes_per_s": rates[min(rates)],
        "target_bytes_per_s": TARGET,
        "writer_is_limit": rates[min(rates)] < TARGET,
        "crc32_bytes_per_s": unit_bytes / crc_s,
        "compression_ratio": units * unit_bytes / max(stored, 1),
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--neurons", type=int, default=11008)
    ap.add_argument("--units", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--work", default=tempfile.gettempdir())
    a = ap.parse_args()
    out = measure(Path(a.work), layers=a.layers, neurons=a.neurons, units=a.units, chunk_rows=a.chunk_rows)
    print(json.dumps(out, indent=2))
    for k, r in out["in_flight_bytes_per_s"].items():
        print(f"writer, {k} unit(s) in flight: {r / 1e9:.2f} GB/s (target {TARGET / 1e9:.0f} GB/s)")


if __name__ == "__main__":
    main()
