"""What caching costs: a cached extraction against the same forward passes with no hooks and no writes.

Both sides run the same examples, in the same units and batches, on the same loaded model; the baseline
asks the model for last-position logits only (``logits_to_keep=1``), which costs what qcache's trimmed LM
head costs. Model loading and tokenization are outside both timings.

    python benchmarks/extract_overhead.py [--bits 32] [--limit 300] [--repeats 2] [--device cuda]

On a GPU both clocks stop after ``torch.cuda.synchronize()`` (kernels run asynchronously), and the inputs
are moved to the device as extraction moves them. Targets: 1.10 on a CPU, 1.05 on a GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qcache.extract.arch.adapters import ModelTaps, parse_layers
from qcache.extract.inputs.datasets import DatasetRequest, load_dataset
from qcache.extract.inputs.tokenize import tokenize
from qcache.extract.models.loading import load_model
from qcache.extract.models.registry import resolve_model
from qcache.extract.quant.quantization import quant_key
from qcache.extract.run.batching import Batching
from qcache.extract.run.runner import ExtractConfig, fill_run
from qcache.extract.run.spec import build_run_spec
from qcache.extract.run.transfer import to_device
from qcache.store import RunKey, RunWriter, open_store
from qcache.store.layout import TokenLayout

TARGETS = {"cpu": 1.10, "cuda": 1.05}  # cached / forwards-only


def baseline_seconds(
    loaded, ids: list[np.ndarray], chunk_rows: int, batch_size: int | None, mode: str = "length-sorted"
) -> float:
    """The extraction's own unit/batch schedule (``Batching``), forward passes only, on ``loaded.device``,
    synchronized before the clock stops."""
    layout = TokenLayout(lengths=np.array([len(x) for x in ids]), chunk_rows=chunk_rows)
    batching = Batching(mode, batch_size)
    pad = batching.pad_id(loaded.tokenizer)
    start = time.perf_counter()
    for unit in range(layout.n_units):
        for batch in batching.unit_batches(layout, unit):  # the runner's batches
            fwd = batching.inputs(ids, batch, pad)
            with torch.inference_mode():
                loaded.model(  # inputs go up as extraction sends them: no wait for the GPU
                    input_ids=to_device(fwd.ids, loaded.device),
                    attention_mask=None
                    if fwd.model_mask is None
                    else to_device(fwd.model_mask, loaded.device),
                    position_ids=None
                    if fwd.position_ids is None
                    else to_device(fwd.position_ids, loaded.device),
                    use_cache=False,
                    logits_to_keep=1,
                )
    synchronize(loaded.device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a GPU clock stopped without this times only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--model", default="smollm2-135m", help="An alias or a local model directory")
    args = ap.parse_args()
    quant = quant_key(args.bits)
    request = DatasetRequest(name="boolq", limit=args.limit)
    data = load_dataset(request)
    source = resolve_model(args.model)
    loaded = load_model(source, quant, device=args.device)
    dev = loaded.device
    tok = tokenize(loaded.tokenizer, data.prompts, 512)
    n_tokens = int(sum(len(x) for x in tok.ids))
    print(
        f"{source.key} {quant} on {dev} ({torch.get_num_threads()} CPU threads), {args.limit} BoolQ prompts, "
        f"{n_tokens} tokens, layers first/middle/last, batch {args.batch_size}"
    )
    # warm-up, so neither side pays first-call costs
    baseline_seconds(loaded, tok.ids[:32], args.chunk_rows, args.batch_size)
    base, cached = [], []
    for r in range(args.repeats):
        base.append(baseline_seconds(loaded, tok.ids, args.chunk_rows, args.batch_size))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(
                model=args.model,
                bits=args.bits,
                store=Path(tmp) / "s",
                dataset=request,
                batch_size=args.batch_size,
                chunk_rows=args.chunk_rows,
                device=args.device,
                progress=False,
            )
            spec = build_run_spec(
                RunKey(data.name, source.key, quant),
                cfg,
                loaded,
                ModelTaps(loaded.model),
                parse_layers("paper", ModelTaps(loaded.model).n_layers),
                data,
                tok,
            )
            writer = RunWriter.open(open_store(cfg.store, create=True), spec)
            t0 = time.perf_counter()
            fill_run(writer, cfg, loaded, ModelTaps(loaded.model), data, tok, log=lambda m: None)
            synchronize(dev)
            cached.append(time.perf_counter() - t0)
        print(
            f"  repeat {r}: forward only {base[-1]:.2f}s ({n_tokens / base[-1]:.0f} tok/s), "
            f"cached {cached[-1]:.2f}s ({n_tokens / cached[-1]:.0f} tok/s)"
        )
    b, c = min(base), min(cached)
    print(f"best of {args.repeats}: forward only {b:.2f}s, cached {c:.2f}s")
    print(
        f"overhead ratio cached/forward-only = {c / b:.3f}  (target <= {TARGETS[dev.type]:.2f} on {dev.type})"
    )


if __name__ == "__main__":
    main()
