"""`qcache analyze ...`: offline analyses from the store (CPU only, no model)."""

from __future__ import annotations

from typing import Any

import click

from qcache.store.keys import QUANTS

from .options import clean_errors, results_option, stacked, store_option

# Filters and engine options shared by every `qcache analyze` command.
analyze_options = stacked(
    [
        click.option("--dataset", default=None, help="Only runs of this dataset."),
        click.option("--model", default=None, help="Only runs of this model key."),
        click.option("--bits", type=int, default=None, help="Only runs at this bit width (32, 16, 8, 4)."),
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
        click.option("--memory-limit", default=None, help="Working-memory bound, e.g. 4GB (sizes blocks)."),
        click.option("--allow-partial", is_flag=True, help="Analyze runs that are not fully extracted."),
        store_option,
        results_option,
        clean_errors,
    ]
)


def _analyze_config(store_path: str, opts: dict[str, Any]) -> Any:
    from qcache.analyze.runner import AnalyzeConfig
    from qcache.analyze.scheduler import parse_memory
    from qcache.store import open_store

    layers = None
    if opts.get("layers"):
        try:
            layers = tuple(int(x) for x in opts["layers"].split(","))
        except ValueError:
            raise click.BadParameter(
                f"--layers {opts['layers']!r} is not a comma list like 1,15,30"
            ) from None
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


def echo_table(table: Any, columns: list[str]) -> None:
    rows = table.select(columns).to_pylist()
    widths = {c: max(len(c), *(len(fmt_cell(r[c])) for r in rows)) if rows else len(c) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        click.echo("  ".join(fmt_cell(r[c]).ljust(widths[c]) for c in columns))


def fmt_cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group()
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
dead_options = [
    click.option(
        "--threshold",
        "dead_threshold",
        type=float,
        default=0.1,
        show_default=True,
        help="Non-ReLU: dead when every |activation| <= this.",
    ),
    click.option(
        "--relu-eps",
        type=float,
        default=0.0,
        show_default=True,
        help="ReLU: dead when every |activation| <= this (paper: 0; authors' code: 1e-6).",
    ),
]
redundancy_options = [
    click.option(
        "--threshold",
        "corr_threshold",
        type=float,
        default=0.8,
        show_default=True,
        help="Count pairs with |r| >= this.",
    ),
    click.option("--per-example", is_flag=True, help="Correlate per-example mean activations, not tokens."),
    click.option("--cross-layer", is_flag=True, help="Also count pairs across the selected layers."),
    click.option(
        "--top-pairs", type=int, default=0, show_default=True, help="Keep the K most correlated pairs."
    ),
]


@analyze.command("calibration")
@stacked(calibration_options)
@analyze_options
def analyze_calibration(store_path: str, **opts: Any) -> None:
    """Accuracy, average confidence, ACE (both variants), ECE, Brier per run."""
    from qcache.analyze.runner import run_calibration

    table = run_calibration(_analyze_config(store_path, opts), log=log)
    echo_table(table, ["dataset", "model", "quant", "metric", "value"])


@analyze.command("dead")
@stacked(dead_options)
@analyze_options
def analyze_dead(store_path: str, **opts: Any) -> None:
    """Dead neurons per layer (the paper's Table 4) and per-neuron statistics."""
    from qcache.analyze.runner import run_dead

    table = run_dead(_analyze_config(store_path, opts), log=log)
    echo_table(table, ["dataset", "model", "quant", "layer", "n_neurons", "n_dead", "pct_dead"])


@analyze.command("redundancy")
@stacked(redundancy_options)
@analyze_options
def analyze_redundancy(store_path: str, **opts: Any) -> None:
    """Exact |Pearson r| of every neuron pair per layer: histogram and pairs above the threshold."""
    from qcache.analyze.runner import run_redundancy

    table = run_redundancy(_analyze_config(store_path, opts), log=log)
    echo_table(
        table, ["dataset", "model", "quant", "layer", "layer_b", "n_pairs", "n_constant", "pairs_above"]
    )


@analyze.command("all")
@stacked(calibration_options + [o for o in dead_options if o is not dead_options[0]])
@analyze_options
@click.pass_context
def analyze_all(ctx: click.Context, store_path: str, **opts: Any) -> None:
    """Calibration, dead neurons, redundancy and drift (defaults), and salience where attributions exist."""
    from qcache.analyze.runner import run_calibration, run_dead, run_drift, run_redundancy

    cfg = _analyze_config(store_path, opts)
    echo_table(run_calibration(cfg, log=log), ["dataset", "model", "quant", "metric", "value"])
    echo_table(
        run_dead(cfg, log=log), ["dataset", "model", "quant", "layer", "n_neurons", "n_dead", "pct_dead"]
    )
    echo_table(run_redundancy(cfg, log=log), ["dataset", "model", "quant", "layer", "n_pairs", "pairs_above"])
    drift_summary = run_drift(cfg, strict=False, log=log)
    if drift_summary.num_rows:
        echo_table(drift_summary, DRIFT_SUMMARY)
    salience_cmd = analyze.commands.get("salience")
    if salience_cmd is not None:
        s = cfg.store
        if any(s.run(k).manifest.get("attributions") for k in s.runs()):
            ctx.invoke(salience_cmd, store_path=store_path, results=opts.get("results"))


DRIFT_SUMMARY = ["dataset", "model", "baseline", "quant", "layer", "n_neurons", "r_median", "r_p05"]
DRIFT_SUMMARY += ["mad_median", "rel_rms_median"]


@analyze.command("drift")
@click.option(
    "--baseline",
    type=click.Choice(list(QUANTS)),
    default=None,
    show_default="fp16, else fp32",
    help="Quantization of the run the others are compared with.",
)
@analyze_options
def analyze_drift(store_path: str, baseline: str | None, **opts: Any) -> None:
    """Per-neuron drift of each run from its baseline run, on the same tokens (beyond the paper).

    For each neuron of each cached layer: Pearson r, mean |difference| and relative RMS difference between a
    run and the baseline run of its dataset and model; --bits picks the compared runs. Writes the
    activation_drift table and prints a summary per layer."""
    from qcache.analyze.runner import run_drift

    echo_table(run_drift(_analyze_config(store_path, opts), baseline=baseline, log=log), DRIFT_SUMMARY)


@analyze.command("salience")
@click.argument("runs", nargs=-1)
@click.option(
    "--threshold",
    type=float,
    default=0.8,
    show_default=True,
    help="Normalized attribution above which a neuron is salient (paper: 0.8; authors' code: 0.7).",
)
@click.option(
    "--repeated-tokens",
    type=click.Choice(["all", "last"]),
    default="all",
    show_default=True,
    help="all: every position of a repeated token counts; last: only its last position (the authors' code "
    "keyed attributions by token string).",
)
@click.option(
    "--max-of",
    type=click.Choice(["abs", "signed"]),
    default="abs",
    show_default=True,
    help="The max strategy: abs: max over tokens of |A|; signed: |max over tokens of A| (the authors' code).",
)
@click.option("--layers", default=None, help="Comma list of layers (default: every attributed layer).")
@click.option("--allow-partial", is_flag=True, help="Use the finished examples of unfinished runs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@store_option
@results_option
@clean_errors
def salience_command(
    store_path: str,
    results: str | None,
    runs: tuple[str, ...],
    threshold: float,
    repeated_tokens: str,
    max_of: str,
    layers: str | None,
    allow_partial: bool,
    as_json: bool,
) -> None:
    """Salient neurons per layer and strategy from stored attributions (the paper's Table 3), and
    their overlap between quantizations of the same model. RUNS default to every run with attributions."""
    import json

    from qcache.analyze.salience import overlap, salience, write_tables
    from qcache.store import RunKey, open_store

    st = open_store(store_path, results=results)
    keys = [RunKey.parse(r) for r in runs] or [k for k in st.runs() if st.run(k).manifest.get("attributions")]
    if not keys:
        click.echo(f"store {store_path} holds no run with attributions (extract with --attributions)")
        return
    chosen = [int(x) for x in layers.split(",")] if layers else None
    found = [
        salience(
            st.run(k),
            threshold=threshold,
            layers=chosen,
            allow_partial=allow_partial,
            repeated_tokens=repeated_tokens,
            max_of=max_of,
        )
        for k in keys
    ]
    pairs = overlap(found)
    write_tables(st.results, found, pairs)
    if as_json:
        out = {
            "counts": [{"run": str(r.run.key), **row} for r in found for row in r.counts.to_pylist()],
            "overlap": pairs.to_pylist(),
        }
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(
        f"salient neurons (normalized attribution > {threshold}, --repeated-tokens {repeated_tokens}, "
        f"--max-of {max_of}), distinct over each run's examples"
    )
    heads = " ".join(f"{h:>6}" for h in ("union", "best", "sum", "max", "mean"))
    click.echo(f"{'dataset/model/quant':<40} {'layer':>5} {heads}")
    for r in found:
        by = {(row["layer"], row["strategy"]): row["n_salient"] for row in r.counts.to_pylist()}
        for layer in sorted({row["layer"] for row in r.counts.to_pylist()}):
            cells = " ".join(f"{by[(layer, s)]:>6}" for s in ("union", "best_token", "sum", "max", "mean"))
            click.echo(f"{r.run.key!s:<40} {layer:>5} {cells}")
    union = [row for row in pairs.to_pylist() if row.get("strategy") == "union"]
    if union:
        click.echo("overlap of the union sets between quantizations")
        for row in union:
            click.echo(
                f"{row['dataset']}/{row['model']} L{row['layer']:<4} {row['quant_a']:>5} vs "
                f"{row['quant_b']:<5} shared {row['n_shared']:>5} of {row['n_a']}/{row['n_b']}  "
                f"jaccard {row['jaccard']:.3f}"
            )
