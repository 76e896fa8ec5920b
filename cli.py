"""The ``qcache`` command line: each command parses options, calls one library function, prints.

Heavy libraries (torch, transformers, bitsandbytes, captum) are imported only inside ``extract``; every
other command, ``--help`` included, runs without them.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from qcache.store.errors import QCacheError
from qcache.store.store import default_store_path


def store_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--store PATH`` (default ``$QCACHE_STORE`` or ``./qcache-store``)."""
    return click.option(
        "--store",
        "store_path",
        type=click.Path(file_okay=True, dir_okay=True),
        default=lambda: str(default_store_path()),
        show_default="$QCACHE_STORE or ./qcache-store",
        help="Store directory.",
    )(f)


def clean_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ``QCacheError`` into one line on stderr and its exit code, never a traceback."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except QCacheError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: committed units are kept; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="qcache")
def main() -> None:
    """Cache LLM activations at 4/8/16/32 bits and analyze what quantization did to the neurons."""


# --- extraction and store commands -----------------------------------------------------------------


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"{value!r}: need 0 <= i < n")
    return i, n


def ig_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--ig-*`` options of Integrated-Gradients attributions (defaults: the authors' code)."""
    options = [
        click.option(
            "--ig-target",
            type=click.Choice(["predicted", "gold"]),
            default="predicted",
            show_default=True,
            help="Attribute the model's own next token, or the gold label's most likely spelling.",
        ),
        click.option(
            "--ig-output",
            type=click.Choice(["logprob", "prob", "logit"]),
            default="logprob",
            show_default=True,
            help="Objective: log-softmax, softmax or logit of the target.",
        ),
        click.option(
            "--ig-baseline",
            type=click.Choice(["zero-id", "pad", "eos"]),
            default="zero-id",
            show_default=True,
            help="Baseline: all input tokens set to id 0, pad or EOS.",
        ),
        click.option("--ig-steps", type=int, default=50, show_default=True, help="Integration steps."),
        click.option(
            "--ig-method",
            type=click.Choice(
                ["gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right"]
            ),
            default="gausslegendre",
            show_default=True,
            help="Captum's approximation method.",
        ),
        click.option(
            "--ig-batch-tokens",
            type=int,
            default=None,
            help="Rows x tokens per step batch (memory budget); default: from free memory.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _ig_config(opts: dict[str, Any]) -> Any:
    from qcache.extract.attribution import IGConfig

    return IGConfig(
        target=opts.pop("ig_target"),
        output=opts.pop("ig_output"),
        baseline=opts.pop("ig_baseline"),
        steps=opts.pop("ig_steps"),
        method=opts.pop("ig_method"),
        batch_tokens=opts.pop("ig_batch_tokens"),
    )


@main.command()
@click.option(
    "--model", required=True, help="Alias (see `qcache models`), Hugging Face id, or local directory."
)
@click.option("--bits", type=int, default=16, show_default=True, help="32, 16, 8 (LLM.int8) or 4 (NF4).")
@click.option(
    "--dataset",
    default="boolq",
    show_default=True,
    help="boolq, toxicity (jigsaw), piqa, hellaswag, a local .jsonl/.csv/.parquet, or hf:ORG/NAME.",
)
@click.option("--limit", type=int, default=None, help="Sample this many examples (seeded).")
@click.option("--seed", type=int, default=42, show_default=True, help="Sampling seed (the paper's is 42).")
@click.option(
    "--split", default="all", show_default=True, help="Dataset split (boolq: train, validation, all)."
)
@click.option("--with-passage", is_flag=True, help="BoolQ with its passage in the prompt (full BoolQ).")
@click.option("--text-field", default=None, help="Text column of a local/Hub dataset.")
@click.option("--label-field", default=None, help="Gold label column of a local/Hub dataset.")
@click.option("--labels", default=None, help="Comma-separated label words, e.g. False,True.")
@click.option("--template", default=None, help="Prompt template with {text}, for local/Hub datasets.")
@click.option(
    "--layers", default="paper", show_default=True, help="'paper' (1, 15, last), 'all', or 1,15,32."
)
@click.option(
    "--tap",
    "taps",
    multiple=True,
    type=click.Choice(["act", "down-in"]),
    default=("act",),
    show_default=True,
    help="Tap point(s): activation output, or the down projection's input.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Examples per forward pass.")
@click.option(
    "--max-length", type=int, default=512, show_default=True, help="Longer prompts lose their front."
)
@click.option(
    "--chunk-rows", type=int, default=1024, show_default=True, help="Token rows per chunk and unit."
)
@click.option("--shard", default="0/1", show_default=True, help="Fill only shard i of n (i/n).")
@click.option("--overwrite", is_flag=True, help="Delete this run and start over instead of resuming.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--attributions", is_flag=True, help="Also cache Integrated-Gradients attributions (float32).")
@ig_options
@store_option
@clean_errors
def extract(store_path: str, **opts: Any) -> None:
    """Run a dataset through a model and cache activations and predictions (resumable)."""
    from pathlib import Path

    from qcache.extract.datasets import DatasetRequest
    from qcache.extract.runner import ExtractConfig, run_extract

    given = [
        f"--{name.replace('_', '-')}"
        for name in opts
        if name.startswith("ig_")
        and click.get_current_context().get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given and not opts["attributions"]:
        raise click.UsageError(f"{', '.join(given)} only apply with --attributions: add it, or drop them")
    ig = _ig_config(opts)
    labels = tuple(w.strip() for w in opts["labels"].split(",")) if opts["labels"] else None
    request = DatasetRequest(
        name=opts["dataset"],
        limit=opts["limit"],
        seed=opts["seed"],
        split=opts["split"],
        with_passage=opts["with_passage"],
        text_field=opts["text_field"],
        label_field=opts["label_field"],
        labels=labels,
        template=opts["template"],
    )
    cfg = ExtractConfig(
        model=opts["model"],
        bits=opts["bits"],
        store=Path(store_path),
        dataset=request,
        layers=opts["layers"],
        taps=tuple(opts["taps"]),
        device=opts["device"],
        batch_size=opts["batch_size"],
        max_length=opts["max_length"],
        chunk_rows=opts["chunk_rows"],
        shard=_parse_shard(opts["shard"]),
        overwrite=opts["overwrite"],
        progress=not opts["quiet"],
        attributions=ig if opts["attributions"] else None,
    )
    result = run_extract(cfg, log=lambda msg: click.echo(msg, err=True))
    click.echo(
        f"{result.key}: {result.units_done}/{result.units_total} units done, "
        f"{result.tokens_written} tokens written in {result.seconds:.1f}s"
    )


@main.command()
@click.argument("run")
@click.option("--replace", is_flag=True, help="Re-extract a run without attributions (or other settings).")
@click.option("--model", default=None, help="Model directory, when the run's model was a local GGUF file.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Examples per forward pass.")
@click.option("--shard", default="0/1", show_default=True, help="Fill only shard i of n (i/n).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@ig_options
@store_option
@clean_errors
def attribute(store_path: str, run: str, **opts: Any) -> None:
    """Add Integrated-Gradients attributions to an extracted RUN (DATASET/MODEL/QUANT); resumable."""
    from pathlib import Path

    from qcache.extract.reattribute import attribute_run

    ig = _ig_config(opts)
    result = attribute_run(
        Path(store_path),
        run,
        ig,
        replace=opts["replace"],
        model=opts["model"],
        log=lambda msg: click.echo(msg, err=True),
        device=opts["device"],
        batch_size=opts["batch_size"],
        shard=_parse_shard(opts["shard"]),
        progress=not opts["quiet"],
    )
    click.echo(
        f"{result.key}: {result.units_done}/{result.units_total} units done, "
        f"{result.tokens_written} tokens attributed in {result.seconds:.1f}s"
    )


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--ig-rtol",
    type=float,
    default=0.05,
    show_default=True,
    help="Attributions: count examples with |delta| > rtol*|F(x)-F(x;a0)| + 1e-3 as unconverged.",
)
@store_option
@clean_errors
def ls_command(store_path: str, as_json: bool, ig_rtol: float) -> None:
    """What is cached: dataset/model/quant/layer, shape, dtype, progress, size, IG convergence."""
    import json

    from qcache.store import open_store
    from qcache.store.listing import describe_store

    rows = describe_store(open_store(store_path), ig_rtol=ig_rtol)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo(f"store {store_path} holds no runs yet")
        return
    header = f"{'dataset/model/quant':<40} {'layer':>5} {'array':<13} {'shape':<16} {'dtype':<8}"
    click.echo(f"{header} {'done':>7} {'MiB':>9}")
    for r in rows:
        run = f"{r['dataset']}/{r['model']}/{r['quant']}"
        shape = "x".join(str(x) for x in r["shape"])
        click.echo(
            f"{run:<40} {r['layer']:>5} {r['array']:<13} {shape:<16} {r['dtype']:<8} "
            f"{100 * r['progress']:>6.1f}% {r['size_mb']:>9.2f}"
            + (f"  IG unconverged {r['ig_unconverged']}/{r['ig_examples']}" if "ig_examples" in r else "")
        )


@main.command()
@click.option("--repair", is_flag=True, help="Withdraw damaged units so `qcache extract` recomputes them.")
@store_option
@clean_errors
def verify(store_path: str, repair: bool) -> None:
    """Check a store: chunks decode, checksums match, shapes and manifests agree."""
    from qcache.store import open_store
    from qcache.store.verify import verify_store

    s = open_store(store_path)
    report = verify_store(s, repair=repair)
    for p in report.problems:
        unit = f" (unit {p.unit})" if p.unit is not None else ""
        click.echo(f"DAMAGED {p.run} {p.where}{unit}: {p.what}", err=True)
    for run, unit in report.repaired:
        click.echo(f"withdrew {run} unit {unit}: rerun its extraction command to recompute it", err=True)
    bad_runs = sorted({p.run for p in report.problems})
    for run in bad_runs:
        cmd = s.run(run).manifest.get("command", "qcache extract ...")
        hint = "recompute with" if report.repaired else "run `qcache verify --repair`, then"
        click.echo(f"{run}: {hint}: {cmd}", err=True)
    click.echo(
        f"checked {report.runs_checked} runs, {report.units_checked} units: "
        f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}"
    )
    if not report.ok:
        sys.exit(1)


@main.command()
def models() -> None:
    """List the model aliases."""
    from qcache.extract.registry import ALIASES

    for alias, hub in ALIASES.items():
        click.echo(f"{alias:<16} {hub}")


# --- analysis and SQL commands ---------------------------------------------------------------------


def analyze_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Filters and engine options shared by every `qcache analyze` command."""
    opts = [
        click.option("--dataset", default=None, help="Only runs of this dataset."),
        click.option("--model", default=None, help="Only runs of this model key."),
        click.option("--bits", type=int, default=None, help="Only runs at this bit width (32, 16, 8, 4)."),
        click.option("--layers", default=None, help="Comma list of cached layers (default: all cached)."),
        click.option(
            "--tap",
            type=click.Choice(["act", "down-in"]),
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
        clean_errors,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _analyze_config(store_path: str, opts: dict[str, Any]) -> Any:
    from pathlib import Path

    from qcache.analyze.runner import AnalyzeConfig
    from qcache.analyze.scheduler import parse_memory

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
        store=Path(store_path),
        layers=layers,
        memory_limit=parse_memory(opts.get("memory_limit")),
        **known,
        **extra,
    )


def _echo_table(table: Any, columns: list[str]) -> None:
    rows = table.select(columns).to_pylist()
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) if rows else len(c) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        click.echo("  ".join(_fmt(r[c]).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@main.group()
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


def _with(options: list[Any]) -> Callable[..., Any]:
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


@analyze.command("calibration")
@_with(calibration_options)
@analyze_options
def analyze_calibration(store_path: str, **opts: Any) -> None:
    """Accuracy, average confidence, ACE (both variants), ECE, Brier per run."""
    from qcache.analyze.runner import run_calibration

    table = run_calibration(_analyze_config(store_path, opts), log=_log)
    _echo_table(table, ["dataset", "model", "quant", "metric", "value"])


@analyze.command("dead")
@_with(dead_options)
@analyze_options
def analyze_dead(store_path: str, **opts: Any) -> None:
    """Dead neurons per layer (the paper's Table 4) and per-neuron statistics."""
    from qcache.analyze.runner import run_dead

    table = run_dead(_analyze_config(store_path, opts), log=_log)
    _echo_table(table, ["dataset", "model", "quant", "layer", "n_neurons", "n_dead", "pct_dead"])


@analyze.command("redundancy")
@_with(redundancy_options)
@analyze_options
def analyze_redundancy(store_path: str, **opts: Any) -> None:
    """Exact |Pearson r| of every neuron pair per layer: histogram and pairs above the threshold."""
    from qcache.analyze.runner import run_redundancy

    table = run_redundancy(_analyze_config(store_path, opts), log=_log)
    _echo_table(
        table, ["dataset", "model", "quant", "layer", "layer_b", "n_pairs", "n_constant", "pairs_above"]
    )


@analyze.command("all")
@_with(calibration_options + [o for o in dead_options if o is not dead_options[0]])
@analyze_options
@click.pass_context
def analyze_all(ctx: click.Context, store_path: str, **opts: Any) -> None:
    """Calibration, dead neurons and redundancy (defaults), and salience where attributions exist."""
    from qcache.analyze.runner import run_calibration, run_dead, run_redundancy

    cfg = _analyze_config(store_path, opts)
    _echo_table(run_calibration(cfg, log=_log), ["dataset", "model", "quant", "metric", "value"])
    _echo_table(
        run_dead(cfg, log=_log), ["dataset", "model", "quant", "layer", "n_neurons", "n_dead", "pct_dead"]
    )
    _echo_table(
        run_redundancy(cfg, log=_log), ["dataset", "model", "quant", "layer", "n_pairs", "pairs_above"]
    )
    salience_cmd = analyze.commands.get("salience")
    if salience_cmd is not None:
        from qcache.store import open_store

        s = open_store(store_path)
        if any(s.run(k).manifest.get("attributions") for k in s.runs()):
            ctx.invoke(salience_cmd, store_path=store_path)


@main.command()
@click.argument("query")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@store_option
@clean_errors
def sql(store_path: str, query: str, fmt: str) -> None:
    """Run a read-only SQL query over the result tables (DuckDB), e.g. SELECT * FROM metrics."""
    import csv
    import json
    from pathlib import Path

    from qcache.store import open_store
    from qcache.store.tables import run_sql

    open_store(store_path)  # a clear error when it is not a store
    columns, rows = run_sql(Path(store_path), query)
    if fmt == "json":
        click.echo(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=1))
    elif fmt == "csv":
        writer = csv.writer(click.get_text_stream("stdout"))
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        import pyarrow as pa

        table = pa.table(
            {
                c: [str(r[i]) if not isinstance(r[i], float) else r[i] for r in rows]
                for i, c in enumerate(columns)
            }
        )
        _echo_table(table, columns)


# --- salience of attributions (analyze) ------------------------------------------------------------
# Attached to the `analyze` group whether that group is defined above or not (yet).
_analyze = main.commands.get("analyze")
if not isinstance(_analyze, click.Group):

    @main.group("analyze")
    def _analyze() -> None:
        """Analyses that read the store; no model and no torch."""


@_analyze.command("salience")
@click.argument("runs", nargs=-1)
@click.option(
    "--threshold",
    type=float,
    default=0.8,
    show_default=True,
    help="Normalized attribution above which a neuron is salient (paper: 0.8; authors' code: 0.7).",
)
@click.option("--layers", default=None, help="Comma list of layers (default: every attributed layer).")
@click.option("--allow-partial", is_flag=True, help="Use the finished examples of unfinished runs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@store_option
@clean_errors
def salience_command(
    store_path: str,
    runs: tuple[str, ...],
    threshold: float,
    layers: str | None,
    allow_partial: bool,
    as_json: bool,
) -> None:
    """Salient neurons per layer and strategy from stored attributions (the paper's Table 3), and
    their overlap between quantizations of the same model. RUNS default to every run with attributions."""
    import json

    from qcache.analyze.salience import overlap, salience, write_tables
    from qcache.store import RunKey, open_store

    st = open_store(store_path)
    keys = [RunKey.parse(r) for r in runs] or [k for k in st.runs() if st.run(k).manifest.get("attributions")]
    if not keys:
        click.echo(f"store {store_path} holds no run with attributions (extract with --attributions)")
        return
    chosen = [int(x) for x in layers.split(",")] if layers else None
    results = [
        salience(st.run(k), threshold=threshold, layers=chosen, allow_partial=allow_partial) for k in keys
    ]
    pairs = overlap(results)
    write_tables(st.root, results, pairs)
    if as_json:
        out = {
            "counts": [{"run": str(r.run.key), **row} for r in results for row in r.counts.to_pylist()],
            "overlap": pairs.to_pylist(),
        }
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(f"salient neurons (normalized attribution > {threshold}), distinct over each run's examples")
    heads = " ".join(f"{h:>6}" for h in ("union", "best", "sum", "max", "mean"))
    click.echo(f"{'dataset/model/quant':<40} {'layer':>5} {heads}")
    for r in results:
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


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="qcache-report",
    show_default=True,
    help="Output directory: report.html, figures/*.png, tables/*.csv.",
)
@click.option(
    "--reading",
    type=click.Choice(["paper", "authors"]),
    default="paper",
    show_default=True,
    help="Answer reading of the calibration figures (both are in the CSVs).",
)
@click.option(
    "--analyze",
    "run_analyses",
    is_flag=True,
    help="First run the analyses whose tables are missing (calibration, dead, redundancy, "
    "salience, drift, overlaps).",
)
@store_option
@clean_errors
def report(store_path: str, out_dir: str, reading: str, run_analyses: bool) -> None:
    """Write a self-contained HTML report of the store (the paper's figures and tables, plus overlaps and
    activation drift), every figure as PNG and every table as CSV."""
    from pathlib import Path

    from qcache.analyze.report import ReportConfig, build_report

    cfg = ReportConfig(store=Path(store_path), out=Path(out_dir), reading=reading, analyze=run_analyses)
    path = build_report(cfg, log=_log)
    click.echo(f"report written to {path} (figures/ and tables/ beside it)")


if __name__ == "__main__":
    main()
