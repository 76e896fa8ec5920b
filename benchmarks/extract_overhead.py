"""What caching costs: a cached extraction against the same forward passes with no hooks and no writes.

Both sides run the same examples, in the same units and batches, on the same loaded model; the baseline
asks the model for last-position logits only (``logits_to_keep=1``), which costs what qcache's trimmed LM
head costs. Model loading and tokenization are outside both timings.

    python benchmarks/extract_overhead.py [--bits 32] [--limit 300] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qcache.extract.adapters import ModelTaps
from qcache.extract.datasets import DatasetRequest, load_dataset
from qcache.extract.loading import load_model
from qcache.extract.quantization import quant_key
from qcache.extract.registry import resolve_model
from qcache.extract.runner import ExtractConfig, build_run_spec, fill_run
from qcache.extract.tokenize import tokenize
from qcache.store import RunKey, RunWriter, open_store
from qcache.store.layout import TokenLayout


def baseline_seconds(loaded, ids: list[np.ndarray], chunk_rows: int, batch_size: int) -> float:
    """The extraction's own unit/batch schedule, forward passes only."""
    layout = TokenLayout(lengths=np.array([len(x) for x in ids]), chunk_rows=chunk_rows)
    pad = loaded.tokenizer.pad_token_id
    start = time.perf_counter()
    for unit in range(layout.n_units):
        examples = layout.unit_examples(unit)
        examples = examples[np.argsort(layout.lengths[examples], kind="stable")]
        for b0 in range(0, len(examples), batch_size):
            batch = examples[b0 : b0 + batch_size]
            seq = int(layout.lengths[batch].max())
            x = np.full((len(batch), seq), pad, dtype=np.int64)
            mask = np.zeros_like(x)
            for i, e in enumerate(batch):
                x[i, : len(ids[e])], mask[i, : len(ids[e])] = ids[e], 1
            with torch.inference_mode():
                loaded.model(
                    input_ids=torch.from_numpy(x),
                    attention_mask=torch.from_numpy(mask),
                    use_cache=False,
                    logits_to_keep=1,
                )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    args = ap.parse_args()
    quant = quant_key(args.bits)
    request = DatasetRequest(name="boolq", limit=args.limit)
    data = load_dataset(request)
    loaded = load_model(resolve_model("smollm2-135m"), quant, device="cpu")
    tok = tokenize(loaded.tokenizer, data.prompts, 512)
    n_tokens = int(sum(len(x) for x in tok.ids))
    print(
        f"SmolLM2-135M {quant} on CPU ({torch.get_num_threads()} threads), {args.limit} BoolQ prompts, "
        f"{n_tokens} tokens, layers 1/15/30, batch {args.batch_size}"
    )
    # warm-up, so neither side pays first-call costs
    baseline_seconds(loaded, tok.ids[:32], args.chunk_rows, args.batch_size)
    base, cached = [], []
    for r in range(args.repeats):
        base.append(baseline_seconds(loaded, tok.ids, args.chunk_rows, args.batch_size))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(
                model="smollm2-135m",
                bits=args.bits,
                store=Path(tmp) / "s",
                dataset=request,
                batch_size=args.batch_size,
                chunk_rows=args.chunk_rows,
                device="cpu",
                progress=False,
            )
            spec = build_run_spec(
                RunKey(data.name, "smollm2-135m", quant),
                cfg,
                loaded,
                ModelTaps(loaded.model),
                [1, 15, 30],
                data,
                tok,
            )
            writer = RunWriter.open(open_store(cfg.store, create=True), spec)
            t0 = time.perf_counter()
            fill_run(writer, cfg, loaded, ModelTaps(loaded.model), data, tok, log=lambda m: None)
            cached.append(time.perf_counter() - t0)
        print(
            f"  repeat {r}: forward only {base[-1]:.2f}s ({n_tokens / base[-1]:.0f} tok/s), "
            f"cached {cached[-1]:.2f}s ({n_tokens / cached[-1]:.0f} tok/s)"
        )
    b, c = min(base), min(cached)
    print(f"best of {args.repeats}: forward only {b:.2f}s, cached {c:.2f}s")
    print(f"overhead ratio cached/forward-only = {c / b:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
