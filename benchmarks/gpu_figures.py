"""The GPU check's figures, one per call, each beside what ``qcache plan`` predicts for it.

    python -m benchmarks.gpu_figures --out DIR [--dry-run] model   # build + save the random model
    python -m benchmarks.gpu_figures --out DIR extract:16             # tokens/s, overhead, peak memory
    python -m benchmarks.gpu_figures --out DIR ig:4                   # IG examples/s against Captum
    python -m benchmarks.gpu_figures --out DIR writer                 # the store writer alone, GB/s

scripts/gpu-check.sh runs them in turn, on a GPU each in its own process under a time limit, so one that
fails or runs out of time costs only its own figure. Each figure adds its record to ``DIR/figures.json``
and rewrites ``DIR/figures.md``. On a GPU the model is Llama-2-7B's full shape (32 layers, random
weights, the SmolLM2 tokenizer for token counts); ``--dry-run`` runs the same code on the CPU with a
tiny model and few examples, so the check cannot rot. Every timed GPU region ends with a synchronize.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Packages the GPU node lacks and scripts/gpu-wheels.sh does not bring: extraction must not import them.
NOT_ON_NODE = ("duckdb", "gguf", "datasets")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def model_dir(args: argparse.Namespace) -> Path:
    """The saved random model; built first when missing (a run of some steps only, on a fresh machine)."""
    path = Path(args.work) / ("tiny-random" if args.dry_run else "llama2-7b-random-32L")
    if not (path / "qcache-random.json").exists():
        fig_model(args)
    return path


def fig_model(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.random_model import save_random_llama

    t0 = time.perf_counter()
    # the dry run keeps a tiny vocabulary: a 49k-token LM head would dominate a toy model's time
    tok = Path(args.tokenizer) if args.tokenizer and not args.dry_run else None
    shape = "tiny" if args.dry_run else "7b"
    layers = 4 if args.dry_run else 32
    where = Path(args.work) / ("tiny-random" if args.dry_run else "llama2-7b-random-32L")
    path = save_random_llama(where, shape=shape, n_layers=layers, tokenizer_dir=tok, device=args.device)
    size = sum(f.stat().st_size for f in path.iterdir())
    return {
        "path": str(path),
        "shape": shape,
        "layers": layers,
        "bytes": size,
        "seconds": time.perf_counter() - t0,
    }


def _prompts(args: argparse.Namespace, tokenizer: Any, limit: int) -> tuple[Any, Any]:
    from qcache.extract.inputs.datasets import DatasetRequest, load_dataset
    from qcache.extract.inputs.tokenize import tokenize

    data = load_dataset(DatasetRequest(name="boolq", limit=limit))
    return data, tokenize(tokenizer, data.prompts, args.max_length)


def fig_extract(args: argparse.Namespace) -> dict[str, Any]:
    """Extraction tokens/s at ``args.bits``, against the same forwards with no hooks and no writes."""
    from benchmarks.extract_overhead import baseline_seconds
    from qcache.extract.models.architecture import describe_model
    from qcache.extract.models.loading import load_model
    from qcache.extract.models.registry import resolve_model
    from qcache.extract.plan.estimate import forward_batches, plan_extract
    from qcache.extract.plan.throughput import calibrate_model
    from qcache.extract.quant.quantization import quant_key
    from qcache.extract.run.batching import Batching
    from qcache.extract.run.runner import ExtractConfig, fill_run, prepare_run
    from qcache.store import TokenLayout

    quant = quant_key(args.bits)
    source = resolve_model(str(model_dir(args)))
    t0 = time.perf_counter()
    loaded = load_model(source, quant, device=args.device)
    _sync(loaded.device)
    load_s = time.perf_counter() - t0
    weights_peak = _peak(loaded.device)
    _, tok = _prompts(args, loaded.tokenizer, args.limit)
    batch = _batch_size(args, quant, loaded.device)  # what `qcache extract` uses unless told
    # warm-up (kernels, autotuning), then a rate estimate that sizes the timed part to the budget
    warm = tok.ids[: min(64, len(tok.ids))]
    baseline_seconds(loaded, warm[:8], args.chunk_rows, batch)
    est = baseline_seconds(loaded, warm, args.chunk_rows, batch)
    rate = sum(len(x) for x in warm) / max(est, 1e-9)
    mean_len = float(np.mean([len(x) for x in tok.ids]))
    # the timed part runs every prompt twice (forwards only, then cached); extraction is ~1.1x the forwards
    fits = int(args.budget_s * rate / (2.2 * mean_len))
    n = max(min(len(tok.ids), fits), min(len(tok.ids), 16))
    _, tok = _prompts(args, loaded.tokenizer, n)
    n_tokens = int(sum(len(x) for x in tok.ids))
    base_s = baseline_seconds(loaded, tok.ids, args.chunk_rows, batch)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        cfg = ExtractConfig(
            model=str(model_dir(args)),
            bits=args.bits,
            store=Path(tmp) / "store",
            dataset=_request(n),
            batch_size=batch,
            chunk_rows=args.chunk_rows,
            max_length=args.max_length,
            device=args.device,
            progress=False,
        )
        plan = plan_extract(cfg)
        # plan --calibrate's measurement, on the model already loaded (a second 7B load costs ~20 s)
        layout = TokenLayout(tok.lengths, args.chunk_rows)
        shapes = forward_batches(layout, Batching("length-sorted", batch))
        rows, seq = max(shapes, key=np.prod)
        rate, _ = calibrate_model(loaded, describe_model(source), int(rows), int(seq))
        run = _prepared(cfg, loaded, prepare_run)
        _peak_reset(loaded.device)
        t0 = time.perf_counter()
        with run.writer.claim(0, 1):
            fill_run(run.writer, cfg, loaded, run.taps, run.data, run.tok, lambda m: None)
        _sync(loaded.device)
        cached_s = time.perf_counter() - t0
        peak = _peak(loaded.device)
        manifest = run.writer.spec.manifest
    kinds = sorted({type(m).__name__ for m in loaded.model.modules() if "Linear" in type(m).__name__})
    return {
        "bits": args.bits,
        "quant": quant,
        "device": manifest["device"],
        "linear_classes": kinds,
        "prompts": n,
        "tokens": n_tokens,
        "layers": manifest["layers"],
        "batch_size": batch,
        "forwards": len(shapes),
        "mean_rows_per_forward": float(np.mean([r for r, _ in shapes])),
        "chunk_rows": args.chunk_rows,
        "load_seconds": load_s,
        "forward_only_seconds": base_s,
        "cached_seconds": cached_s,
        "forward_only_tokens_per_s": n_tokens / base_s,
        "cached_tokens_per_s": n_tokens / cached_s,
        "overhead": cached_s / base_s,
        "overhead_target": 1.05 if loaded.device.type == "cuda" else 1.10,
        "peak_memory_bytes": peak,
        "weights_memory_bytes": weights_peak,
        "plan_seconds": plan.time.seconds,
        "plan_rate_from": plan.time.rate_from,
        "plan_calibrated_seconds": plan.time.forward_flops / rate,
        "plan_calibrated_rate": rate,
        "plan_calibrated_from": f"one {rows}x{seq}-token forward (plan --calibrate's measurement)",
        "plan_memory_bytes": plan.memory.total,
        "plan_disk_bytes": plan.disk.pending,
        "not_on_node_imported": [m for m in NOT_ON_NODE if m in sys.modules],
    }


def _batch_size(args: argparse.Namespace, quant: str, device: Any) -> int:
    """``--batch-size``, else extraction's default for the method on the device (run/batch_size.py)."""
    from qcache.extract.quant.registry import parse_key
    from qcache.extract.run.batch_size import default_batch_size

    if args.batch_size is not None:
        return int(args.batch_size)
    return default_batch_size("length-sorted", device.type, parse_key(quant).kind)


def _request(n: int) -> Any:
    from qcache.extract.inputs.datasets import DatasetRequest

    return DatasetRequest(name="boolq", limit=n)


def _prepared(cfg: Any, loaded: Any, prepare_run: Any) -> Any:
    """``prepare_run`` with the already loaded model (no second load of the weights)."""
    import qcache.extract.run.runner as runner

    real = runner.load_model
    runner.load_model = lambda *a, **k: loaded  # type: ignore[assignment]
    try:
        return prepare_run(cfg, lambda m: None)
    finally:
        runner.load_model = real  # type: ignore[assignment]


def fig_ig(args: argparse.Namespace) -> dict[str, Any]:
    """IG examples/s at layers first/middle/last: qcache (batched, and one example per batch) against
    a plain Captum ``LayerIntegratedGradients`` call per example and layer, and their agreement."""
    from captum.attr import LayerIntegratedGradients

    from qcache.extract.arch.adapters import ModelTaps, parse_layers
    from qcache.extract.attrib.attribution import IGConfig
    from qcache.extract.models.architecture import describe_model
    from qcache.extract.models.loading import load_model
    from qcache.extract.models.registry import resolve_model
    from qcache.extract.plan.throughput import calibrate_model, forward_flops, ig_flops
    from qcache.extract.quant.quantization import quant_key
    from qcache.extract.run.runner import ExtractConfig, fill_run, prepare_run

    quant = quant_key(args.bits)
    source = resolve_model(str(model_dir(args)))
    loaded = load_model(source, quant, device=args.device, for_gradients=True)
    model, dev = loaded.model, loaded.device
    taps = ModelTaps(model)
    layers = parse_layers("paper", taps.n_layers)
    _, tok = _prompts(args, loaded.tokenizer, args.ig_examples)
    ig = IGConfig(steps=args.ig_steps)
    out: dict[str, Any] = {
        "bits": args.bits,
        "quant": quant,
        "examples": len(tok.ids),
        "steps": args.ig_steps,
    }
    out["layers"] = layers
    lengths = np.array([len(x) for x in tok.ids])
    out["tokens"] = int(lengths.sum())
    timings = {}
    out["batch_size"] = _batch_size(args, quant, dev)
    for name, batch in (("qcache_batched", out["batch_size"]), ("qcache_one_per_batch", 1)):
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            cfg = ExtractConfig(
                model=str(model_dir(args)), bits=args.bits, store=Path(tmp) / "s",
                dataset=_request(len(tok.ids)), layers="paper", batch_size=batch,
                device=args.device, progress=False, attributions=ig,
            )  # fmt: skip
            run = _prepared(cfg, loaded, prepare_run)
            _peak_reset(dev)
            t0 = time.perf_counter()
            with run.writer.claim(0, 1):
                fill_run(run.writer, cfg, loaded, run.taps, run.data, run.tok, lambda m: None, run.attributor)
            _sync(dev)
            timings[name] = time.perf_counter() - t0
            out[f"{name}_peak_memory_bytes"] = _peak(dev)
            if name == "qcache_batched":
                from qcache import store as qstore

                got = qstore.open(Path(tmp) / "s").run(str(run.writer.spec.key))
                ours = {n: got.attributions(n).compute().astype(np.float32) for n in layers}
                starts = got.layout.starts

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=x).logits[:, -1].float(), dim=-1)

    worst = 0.0
    t0 = time.perf_counter()
    for n in layers:
        lig = LayerIntegratedGradients(forward, taps.tap(n, "act").module, multiply_by_inputs=True)
        for j, ids in enumerate(tok.ids):
            x = torch.as_tensor(ids, dtype=torch.long, device=dev)[None]
            with torch.no_grad():
                target = int(forward(x).argmax())
            attr = lig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=args.ig_steps,
                                 method="gausslegendre")  # fmt: skip
            ref = attr.reshape(x.shape[1], -1).float().detach().cpu().numpy()
            got_rows = ours[n][int(starts[j]) : int(starts[j]) + x.shape[1]]
            worst = max(worst, float(np.abs(ref - got_rows).max() / max(np.abs(ref).max(), 1e-30)))
    _sync(dev)
    timings["captum_per_example"] = time.perf_counter() - t0
    for k, s in timings.items():
        out[f"{k}_seconds"] = s
        out[f"{k}_examples_per_s"] = len(tok.ids) / s
    out["max_rel_diff_vs_captum"] = worst
    arch = describe_model(source)
    flops = ig_flops(arch, lengths, layers, args.ig_steps)
    # plan --calibrate --attributions: one forward batch and one IG step chunk of the loaded model
    f_rate, ig_rate = calibrate_model(loaded, arch, len(lengths), int(lengths.max()), ig)
    forwards = 2 * forward_flops(arch, [(len(lengths), int(lengths.max()))])  # ordinary + baseline
    out["plan_ig_flops"] = flops
    out["plan_ig_seconds_calibrated"] = flops / ig_rate + forwards / f_rate
    return out


def fig_writer(args: argparse.Namespace) -> dict[str, Any]:
    """The store writer alone: activation bytes per second it commits (float16, all 7B-width layers)."""
    from benchmarks.writer_rate import measure

    layers = 4 if args.dry_run else 16  # half of a 7B's --layers all: units of 360 MB
    neurons = 384 if args.dry_run else 11008
    units = 2 if args.dry_run else 4
    return measure(Path(args.work), layers=layers, neurons=neurons, units=units, chunk_rows=args.chunk_rows)


FIGURES = {"model": fig_model, "extract": fig_extract, "ig": fig_ig, "writer": fig_writer}


def record(out: Path, name: str, fig: dict[str, Any]) -> None:
    """Add ``fig`` to ``out/figures.json`` and rewrite ``out/figures.md``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "figures.json"
    figures = json.loads(path.read_text()) if path.exists() else []
    figures.append({"figure": name, **fig})
    path.write_text(json.dumps(figures, indent=2, default=str))
    from benchmarks.gpu_report import render

    (out / "figures.md").write_text(render(figures))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("figures", nargs="+", help="model, writer, extract:BITS or ig:BITS, in turn")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", default=os.environ.get("QCACHE_GPU_WORK", "/tmp/qcache-gpu"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few examples")
    ap.add_argument("--tokenizer", default=os.environ.get("QCACHE_GPU_TOKENIZER"))
    ap.add_argument("--limit", type=int, default=1000, help="BoolQ prompts (fewer if the budget is short)")
    ap.add_argument("--budget-s", type=float, default=60.0, help="Seconds the timed part may take")
    ap.add_argument("--batch-size", type=int, default=None, help="Default: extraction's (run/batch_size.py)")
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--ig-examples", type=int, default=8)
    ap.add_argument("--ig-steps", type=int, default=50)
    args = ap.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.limit, args.ig_examples, args.ig_steps = min(args.limit, 12), min(args.ig_examples, 2), 4
    Path(args.work).mkdir(parents=True, exist_ok=True)
    failed = 0
    for spec in args.figures:
        name, _, bits = spec.partition(":")
        if name not in FIGURES or (name in ("extract", "ig")) != bool(bits):
            ap.error(f"figure {spec!r}: use model, writer, extract:BITS or ig:BITS")
        if bits:
            args.bits = int(bits)
        failed += not run_figure(args, name, spec.replace(":", "-"))
    return 1 if failed else 0


def run_figure(args: argparse.Namespace, name: str, label: str) -> bool:
    """Measure one figure and record it, or record why it failed; True when it was measured."""
    t0 = time.perf_counter()
    try:
        fig = FIGURES[name](args)
        fig["ok"] = True
    except Exception as exc:  # the record says what failed; the check goes on with the next figure
        import traceback

        traceback.print_exc()
        fig = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    fig["wall_seconds"] = time.perf_counter() - t0
    fig["args"] = {k: v for k, v in vars(args).items() if k not in ("out", "figures")}
    record(args.out, label, fig)
    print(json.dumps(fig, default=str))
    return bool(fig["ok"])


if __name__ == "__main__":
    raise SystemExit(main())
