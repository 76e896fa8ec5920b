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
        click.option("--ig-target", type=click.Choice(["predicted", "gold"]), default="predicted", show_default=True,
                     help="Attribute the model's own next token, or the gold label's most likely spelling."),
        click.option("--ig-output", type=click.Choice(["logprob", "prob", "logit"]), default="logprob",
                     show_default=True, help="Objective: log-softmax, softmax or logit of the target."),
        click.option("--ig-baseline", type=click.Choice(["zero-id", "pad", "eos"]), default="zero-id",
                     show_default=True, help="Baseline input: every token replaced by id 0, the pad or the EOS id."),
        click.option("--ig-steps", type=int, default=50, show_default=True, help="Integration steps."),
        click.option("--ig-method", type=click.Choice(["gausslegendre", "riemann_trapezoid", "riemann_middle",
                                                        "riemann_left", "riemann_right"]),
                     default="gausslegendre", show_default=True, help="Captum's approximation method."),
        click.option("--ig-batch-tokens", type=int, default=None,
                     help="Rows x tokens per step batch (memory budget); default: from free memory."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _ig_config(opts: dict[str, Any]) -> Any:
    from qcache.extract.attribution import IGConfig

    return IGConfig(target=opts.pop("ig_target"), output=opts.pop("ig_output"), baseline=opts.pop("ig_baseline"),
                    steps=opts.pop("ig_steps"), method=opts.pop("ig_method"), batch_tokens=opts.pop("ig_batch_tokens"))


@main.command()
@click.option("--model", required=True, help="Alias (see `qcache models`), Hugging Face id, or local directory.")
@click.option("--bits", type=int, default=16, show_default=True, help="32, 16, 8 (LLM.int8) or 4 (NF4).")
@click.option("--dataset", default="boolq", show_default=True,
              help="boolq, toxicity (jigsaw), piqa, hellaswag, a local .jsonl/.csv/.parquet, or hf:ORG/NAME.")
@click.option("--limit", type=int, default=None, help="Sample this many examples (seeded).")
@click.option("--seed", type=int, default=42, show_default=True, help="Sampling seed (the paper's is 42).")
@click.option("--split", default="all", show_default=True, help="Dataset split (boolq: train, validation, all).")
@click.option("--with-passage", is_flag=True, help="BoolQ with its passage in the prompt (full BoolQ).")
@click.option("--text-field", default=None, help="Text column of a local/Hub dataset.")
@click.option("--label-field", default=None, help="Gold label column of a local/Hub dataset.")
@click.option("--labels", default=None, help="Comma-separated label words, e.g. False,True.")
@click.option("--template", default=None, help="Prompt template with {text}, for local/Hub datasets.")
@click.option("--layers", default="paper", show_default=True, help="'paper' (1, 15, last), 'all', or 1,15,32.")
@click.option("--tap", "taps", multiple=True, type=click.Choice(["act", "down-in"]), default=("act",),
              show_default=True, help="Tap point(s): activation output, or the down projection's input.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True, help="Longer prompts lose their front.")
@click.option("--chunk-rows", type=int, default=1024, show_default=True, help="Token rows per chunk and unit.")
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

    ig = _ig_config(opts)
    labels = tuple(w.strip() for w in opts["labels"].split(",")) if opts["labels"] else None
    request = DatasetRequest(
        name=opts["dataset"], limit=opts["limit"], seed=opts["seed"], split=opts["split"],
        with_passage=opts["with_passage"], text_field=opts["text_field"], label_field=opts["label_field"],
        labels=labels, template=opts["template"],
    )
    cfg = ExtractConfig(
        model=opts["model"], bits=opts["bits"], store=Path(store_path), dataset=request, layers=opts["layers"],
        taps=tuple(opts["taps"]), device=opts["device"], batch_size=opts["batch_size"],
        max_length=opts["max_length"], chunk_rows=opts["chunk_rows"], shard=_parse_shard(opts["shard"]),
        overwrite=opts["overwrite"], progress=not opts["quiet"], attributions=ig if opts["attributions"] else None,
    )
    result = run_extract(cfg, log=lambda msg: click.echo(msg, err=True))
    click.echo(
        f"{result.key}: {result.units_done}/{result.units_total} units done, "
        f"{result.tokens_written} tokens written in {result.seconds:.1f}s"
    )


@main.command()
@click.argument("run")
@click.option("--replace", is_flag=True, help="Re-extract a run that has no attributions (or other settings).")
@click.option("--model", default=None, help="Model directory, when the run's model was a local GGUF file.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--batch-size", type=int, default=16, show_default=True)
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
        Path(store_path), run, ig, replace=opts["replace"], model=opts["model"],
        log=lambda msg: click.echo(msg, err=True), device=opts["device"], batch_size=opts["batch_size"],
        shard=_parse_shard(opts["shard"]), progress=not opts["quiet"],
    )
    click.echo(
        f"{result.key}: {result.units_done}/{result.units_total} units done, "
        f"{result.tokens_written} tokens attributed in {result.seconds:.1f}s"
    )


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--ig-rtol", type=float, default=0.05, show_default=True,
              help="Attributions: count examples with |delta| > rtol*|F(x)-F(x;a0)| + 1e-3 as unconverged.")
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
    click.echo(f"{'dataset/model/quant':<40} {'layer':>5} {'array':<13} {'shape':<16} {'dtype':<8} {'done':>7} {'MiB':>9}")
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
    click.echo(f"checked {report.runs_checked} runs, {report.units_checked} units: "
               f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    if not report.ok:
        sys.exit(1)


@main.command()
def models() -> None:
    """List the model aliases."""
    from qcache.extract.registry import ALIASES

    for alias, hub in ALIASES.items():
        click.echo(f"{alias:<16} {hub}")

# --- analysis and SQL commands ---------------------------------------------------------------------


if __name__ == "__main__":
    main()
