"""`qcache analyze ...`: offline analyses from the store (CPU only, no model)."""

from __future__ import annotations

from typing import Any

import click

from .options import clean_errors, examples, layer_list, renamed, results_option, stacked, store_option
from .output import Table, aligned, emit, format_option
from .salience import compute_salience, salience_command, salience_tables, salience_text, salience_threshold

# Which runs: the filters of every `qcache analyze` command.
run_filters = [
    click.option("--dataset", default=None, help="Only runs of this dataset."),
    click.option("--model", default=None, help="Only runs of this model key."),
    click.option("--bits", type=int, default=None, help="Only runs at this bit width (32, 16, 8, 4)."),
]
# What to read and how: the commands that scan activations (not calibration, which reads predictions).
scan_options = [
    click.option("--layers", default=None, help="Comma list of cached layers (default: all cached)."),
    click.option(
        "--tap",
        type=click.Choice(["act", "down-in", "resid"]),
        default="act",
        show_default=True,
        help="Which cached tap point to analyze.",
    ),
    click.option(
        "--scheduler",
        default=None,
        help="threads (default, one per core), sync, local-cluster, or tcp://HOST:PORT.",
    ),
    click.option(
        "--memory-limit",
        default=None,
        help="Working-memory bound of the Gram passes, e.g. 4GB (default 4 GiB).",
    ),
]
common_tail = [
    click.option("--allow-partial", is_flag=True, help="Analyze runs that are not fully extracted."),
    format_option(),
    store_option,
    results_option,
    clean_errors,
]
# Filters, scan and engine options, output: every `qcache analyze` command that scans activations.
analyze_options = stacked(run_filters + scan_options + common_tail)


def _analyze_config(store_path: str, opts: dict[str, Any]) -> Any:
    from qcache.analyze.runner import AnalyzeConfig
    from qcache.analyze.scheduler import parse_memory
    from qcache.store import open_store

    layers = layer_list(opts["layers"]) if opts.get("layers") else None
    known = {
        k: opts[k] for k in ("dataset", "model", "bits", "tap", "scheduler", "allow_partial") if k in opts
    }
    extra = {
        k: opts[k]
        for k in (
            "reading",
            "n_ranges",
            "dead_threshold",
            "relu_eps",
            "corr_threshold",
            "per_example",
            "cross_layer",
            "top_pairs",
        )
        if k in opts
    }
    return AnalyzeConfig(
        store=open_store(store_path, results=opts.get("results")),
        layers=layers,
        memory_limit=parse_memory(opts.get("memory_limit")),
        **known,
        **extra,
    )


def log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(
    epilog=examples(
        "qcache analyze all",
        "qcache analyze dead --model smollm2-135m --dead-threshold 0.05 --format csv",
        "qcache analyze salience --salience-threshold 0.7",
    )
)
def analyze() -> None:
    """Offline analyses from the store (CPU only, no model): calibration, dead, redundancy, salience."""


calibration_options = [
    click.option(
        "--reading",
        type=click.Choice(["paper", "authors"]),
        default="paper",
        show_default=True,
        help="paper: label words renormalized; authors: full-vocabulary argmax token.",
    ),
    click.option("--ranges", "n_ranges", type=int, default=10, show_default=True, help="ACE ranges R."),
]
dead_threshold = click.option(
    "--dead-threshold",
    "dead_threshold",
    type=float,
    default=0.1,
    show_default=True,
    help="Non-ReLU: dead when every |activation| <= this.",
)
relu_eps = click.option(
    "--relu-eps",
    type=float,
    default=0.0,
    show_default=True,
    help="ReLU: dead when every |activation| <= this (paper: 0; authors' code: 1e-6).",
)
r_threshold = click.option(
    "--r-threshold",
    "corr_threshold",
    type=float,
    default=0.8,
    show_default=True,
    help="Count neuron pairs with |Pearson r| >= this.",
)
redundancy_options = [
    click.option("--per-example", is_flag=True, help="Correlate per-example mean activations, not tokens."),
    click.option("--cross-layer", is_flag=True, help="Also count pairs across the selected layers."),
    click.option(
        "--top-pairs", type=int, default=0, show_default=True, help="Keep the K most correlated pairs."
    ),
]
CALIBRATION = ["dataset", "model", "quant", "metric", "value"]
DEAD = ["dataset", "model", "quant", "layer", "n_neurons", "n_dead", "pct_dead"]
REDUNDANCY = ["dataset", "model", "quant", "layer", "layer_b", "n_pairs", "n_constant", "pairs_above"]


def _table(table: Any, columns: list[str]) -> Any:
    return Table.from_arrow(table, _shown(table, columns))


def _shown(table: Any, columns: list[str]) -> list[str]:
    """``columns``, with ``expert`` and ``n_tokens`` after ``layer`` when the table has per-expert rows."""
    if "expert" not in table.column_names or table["expert"].null_count == table.num_rows:
        return columns
    at = columns.index("layer") + 1
    return [*columns[:at], "expert", "n_tokens", *(c for c in columns[at:] if c != "n_tokens")]


@analyze.command(
    "calibration",
    epilog=examples(
        "qcache analyze calibration",
        "qcache analyze calibration --model smollm2-135m --reading authors --format csv",
        "qcache analyze calibration --bits 4 --ranges 15 --format json",
    ),
)
@stacked(calibration_options + run_filters + common_tail)
def analyze_calibration(store_path: str, fmt: str, **opts: Any) -> None:
    """Accuracy, average confidence, ACE (both variants), ECE, Brier per run."""
    from qcache.analyze.runner import run_calibration

    table = run_calibration(_analyze_config(store_path, opts), log=log)
    emit(fmt, Table.from_arrow(table, CALIBRATION))


@analyze.command(
    "dead",
    epilog=examples(
        "qcache analyze dead",
        "qcache analyze dead --model smollm2-135m --layers 1,15 --dead-threshold 0.05",
        "qcache analyze dead --bits 4 --tap down-in --memory-limit 4GB --format csv",
    ),
)
@stacked([dead_threshold, renamed("--threshold", "dead_threshold", float), relu_eps])
@analyze_options
def analyze_dead(store_path: str, fmt: str, **opts: Any) -> None:
    """Dead neurons per layer (the paper's Table 4) and per-neuron statistics."""
    from qcache.analyze.runner import run_dead

    table = run_dead(_analyze_config(store_path, opts), log=log)
    emit(fmt, Table.from_arrow(table, _shown(table, DEAD)))


@analyze.command(
    "redundancy",
    epilog=examples(
        "qcache analyze redundancy",
        "qcache analyze redundancy --layers 15 --r-threshold 0.9 --top-pairs 20",
        "qcache analyze redundancy --per-example --cross-layer --format json",
    ),
)
@stacked([r_threshold, renamed("--threshold", "corr_threshold", float), *redundancy_options])
@analyze_options
def analyze_redundancy(store_path: str, fmt: str, **opts: Any) -> None:
    """Exact |Pearson r| of every neuron pair per layer: histogram and pairs above the threshold."""
    from qcache.analyze.runner import run_redundancy

    table = run_redundancy(_analyze_config(store_path, opts), log=log)
    emit(fmt, Table.from_arrow(table, _shown(table, REDUNDANCY)))


@analyze.command(
    "all",
    epilog=examples(
        "qcache analyze all",
        "qcache analyze all --model smollm2-135m --dead-threshold 0.05 --r-threshold 0.9",
        "qcache analyze all --memory-limit 8GB --format json",
    ),
)
@stacked([*calibration_options, dead_threshold, relu_eps, r_threshold, salience_threshold])
@analyze_options
def analyze_all(store_path: str, fmt: str, threshold: float, **opts: Any) -> None:
    """Calibration, dead neurons, redundancy (per-token |r|) and drift from the baseline run, and salience
    where attributions exist; the scan options (--layers ...) apply to all but calibration."""
    from qcache.analyze.runner import run_calibration, run_dead, run_drift, run_redundancy

    cfg = _analyze_config(store_path, opts)
    tables = {
        "calibration": Table.from_arrow(run_calibration(cfg, log=log), CALIBRATION),
        "dead": _table(run_dead(cfg, log=log), DEAD),
        "redundancy": _table(run_redundancy(cfg, log=log), REDUNDANCY),
    }
    drift_summary = run_drift(cfg, strict=False, log=log)
    if drift_summary.num_rows:
        tables["drift"] = Table.from_arrow(drift_summary, DRIFT_SUMMARY)
    s = cfg.store
    keys = [k for k in s.runs() if s.run(k).manifest.get("attributions")]
    found = []
    if keys:
        found, pairs = compute_salience(
            s, keys, threshold=threshold, layers=opts["layers"], allow_partial=opts["allow_partial"]
        )
        tables.update(salience_tables(found, pairs))

    def text() -> str:
        shown = [n for n in ("calibration", "dead", "redundancy", "drift") if n in tables]
        parts = [f"{name}:\n{aligned(tables[name])}" for name in shown]
        if found:
            parts.append("salience:\n" + salience_text(found, tables["overlap"]))
        return "\n\n".join(parts)

    emit(fmt, tables, text=text)


analyze.add_command(salience_command)


DRIFT_SUMMARY = ["dataset", "model", "baseline", "quant", "layer", "n_neurons", "r_median", "r_p05"]
DRIFT_SUMMARY += ["mad_median", "rel_rms_median"]


@analyze.command(
    "drift",
    epilog=examples(
        "qcache analyze drift",
        "qcache analyze drift --baseline fp32 --bits 4 --layers 15",
        "qcache analyze drift --model smollm2-135m --format csv",
    ),
)
@click.option(
    "--baseline",
    default=None,
    show_default="fp16, else fp32",
    help="Quantization key of the run the others are compared with (e.g. fp16, fp32, bf16).",
)
@analyze_options
def analyze_drift(store_path: str, fmt: str, baseline: str | None, **opts: Any) -> None:
    """Per-neuron drift of each run from its baseline run, on the same tokens (beyond the paper).

    For each neuron of each cached layer: Pearson r, mean |difference| and relative RMS difference between a
    run and the baseline run of its dataset and model; --bits picks the compared runs. Writes the
    activation_drift table and prints a summary per layer."""
    from qcache.analyze.runner import run_drift

    table = run_drift(_analyze_config(store_path, opts), baseline=baseline, log=log)
    emit(fmt, Table.from_arrow(table, DRIFT_SUMMARY))
