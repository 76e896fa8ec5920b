"""The GPU check's figures (benchmarks/gpu_figures.py records) as one markdown page."""

from __future__ import annotations

from typing import Any


def _gib(b: Any) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def _num(x: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def render(figures: list[dict[str, Any]]) -> str:
    """Markdown of every record: the failures first, then one table per kind of figure."""
    lines = ["# GPU check: figures", ""]
    failed = [f for f in figures if not f.get("ok")]
    if failed:
        lines += ["## Failed", ""]
        lines += [f"- `{f['figure']}`: {f.get('error', '?')}" for f in failed]
        lines.append("")
    by = {k: [f for f in figures if f.get("ok") and f["figure"].split("-")[0] == k] for k in
          ("model", "extract", "ig", "writer")}  # fmt: skip
    for f in by["model"]:
        lines += [
            "## Model",
            "",
            f"{f['shape']} Llama, {f['layers']} layers, random weights, saved to `{f['path']}` "
            f"({_gib(f['bytes'])}, {f['seconds']:.0f} s to build and save).",
            "",
        ]
    if by["extract"]:
        lines += [
            "## Extraction (BoolQ prompts, layers first/middle/last)",
            "",
            "| bits | Linear | prompts | tokens | rows/forward | forwards only tok/s | cached tok/s "
            "| overhead (target) | peak memory | plan: seconds (default rate / calibrated) "
            "| measured seconds | plan memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for f in by["extract"]:
            lines.append(
                f"| {f['bits']} | {', '.join(f['linear_classes'])} | {f['prompts']} | {f['tokens']} "
                f"| {f['mean_rows_per_forward']:.1f} "
                f"| {_num(f['forward_only_tokens_per_s'])} | {_num(f['cached_tokens_per_s'])} "
                f"| {f['overhead']:.3f} ({f['overhead_target']}) | {_gib(f['peak_memory_bytes'])} "
                f"| {f['plan_seconds']:.1f} / {f['plan_calibrated_seconds']:.1f} | {f['cached_seconds']:.1f} "
                f"| {_gib(f['plan_memory_bytes'])} |"
            )
        dev = by["extract"][0]["device"]
        lines += [
            "",
            f"Device: `{dev}`. Load times: "
            + ", ".join(f"{f['bits']} bits {f['load_seconds']:.0f} s" for f in by["extract"])
            + ".",
            "",
        ]
        leaked = sorted({m for f in by["extract"] for m in f["not_on_node_imported"]})
        lines += [f"Imported by extraction although the node lacks them: {leaked or 'none'}.", ""]
    if by["ig"]:
        lines += [
            "## Integrated Gradients (layers first/middle/last)",
            "",
            "| bits | examples | steps | qcache batched ex/s | qcache one per batch ex/s "
            "| Captum per example ex/s | max rel. diff vs Captum | peak memory "
            "| plan seconds (calibrated) | measured seconds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for f in by["ig"]:
            lines.append(
                f"| {f['bits']} | {f['examples']} | {f['steps']} "
                f"| {f['qcache_batched_examples_per_s']:.3f} "
                f"| {f['qcache_one_per_batch_examples_per_s']:.3f} "
                f"| {f['captum_per_example_examples_per_s']:.3f} | {f['max_rel_diff_vs_captum']:.1e} "
                f"| {_gib(f['qcache_batched_peak_memory_bytes'])} | {f['plan_ig_seconds_calibrated']:.1f} "
                f"| {f['qcache_batched_seconds']:.1f} |"
            )
        lines.append("")
    for f in by["writer"]:
        rates = ", ".join(f"{k} in flight {v / 1e9:.2f} GB/s" for k, v in f["in_flight_bytes_per_s"].items())
        lines += [
            "## Store writer alone",
            "",
            f"{f['layers']} float16 arrays of {f['neurons']} neurons, "
            f"units of {f['unit_bytes'] / 1e6:.0f} MB: "
            f"{rates} (target {f['target_bytes_per_s'] / 1e9:.0f} GB/s); crc32 alone "
            f"{f['crc32_bytes_per_s'] / 1e9:.2f} GB/s; compression ratio {f['compression_ratio']:.2f}.",
            "",
        ]
    return "\n".join(lines)
