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
@store_option
@clean_errors
def extract(store_path: str, **opts: Any) -> None:
    """Run a dataset through a model and cache activations and predictions (resumable)."""
    from pathlib import Path

    from qcache.extract.datasets import DatasetRequest
    from qcache.extract.runner import ExtractConfig, run_extract

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
        overwrite=opts["overwrite"], progress=not opts["quiet"],
    )
    result = run_extract(cfg, log=lambda msg: click.echo(msg, err=True))
    click.echo(
        f"{result.key}: {result.units_done}/{result.units_total} units done, "
        f"{result.tokens_written} tokens written in {result.seconds:.1f}s"
    )


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@store_option
@clean_errors
def ls_command(store_path: str, as_json: bool) -> None:
    """What is cached: dataset/model/quant/layer, shape, dtype, progress, size."""
    import json

    from qcache.store import open_store
    from qcache.store.listing import describe_store

    rows = describe_store(open_store(store_path))
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
        )


@main.command()
def models() -> None:
    """List the model aliases."""
    from qcache.extract.registry import ALIASES

    for alias, hub in ALIASES.items():
        click.echo(f"{alias:<16} {hub}")

# --- analysis and SQL commands ---------------------------------------------------------------------


if __name__ == "__main__":
    main()
