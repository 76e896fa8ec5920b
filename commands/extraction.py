"""`qcache extract` and `qcache attribute`: the GPU-node side (torch is imported only when they run)."""

from __future__ import annotations

from typing import Any

import click

from .extract_options import (
    LAUNCHER,
    LAUNCHER_SETS,
    attributions_option,
    ig_options,
    launcher_options,
    parse_shard,
    run_options,
)
from .options import clean_errors, examples, flat, store_option


def _ig_config(opts: dict[str, Any]) -> Any:
    from qcache.extract.attrib.attribution import IGConfig

    return IGConfig(
        target=opts.pop("ig_target"),
        output=opts.pop("ig_output"),
        baseline=opts.pop("ig_baseline"),
        steps=opts.pop("ig_steps"),
        method=opts.pop("ig_method"),
        batch_tokens=opts.pop("ig_batch_tokens"),
    )


@click.command(
    epilog=examples(
        "qcache extract --model smollm2-135m --bits 4 --limit 64 --device cpu",
        "qcache extract --model llama2-7b --bits 8 --dataset boolq --with-passage --attributions",
        "qcache extract --model phi-2 --bits 16 --layers 1,15 --tap act,down-in --gpus all",
    )
)
@run_options
@click.option(
    "--shard",
    default="0/1",
    show_default=True,
    help="Fill only shard i of n (i/n); under torchrun RANK/WORLD_SIZE.",
)
@launcher_options
@click.option("--overwrite", is_flag=True, help="Delete this run and start over instead of resuming.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--no-disk-check",
    is_flag=True,
    help="Start even when the store's disk has less free space than the run may need.",
)
@attributions_option
@ig_options
@store_option
@clean_errors
def extract(store_path: str, **opts: Any) -> None:
    """Run a dataset through a model and cache activations and predictions (resumable)."""
    from qcache.extract.launch.launcher import extract_run

    ctx = click.get_current_context()
    cfg = extract_config(store_path, opts, ctx)
    launcher = {name: opts[name] for name in LAUNCHER}
    result = extract_run(cfg, **launcher, given=_given(ctx), child_args=_child_args(ctx), log=_log)
    click.echo(
        f"{result.key}: {result.units_done}/{result.units_total} units done, "
        f"{result.tokens_written} tokens written in {result.seconds:.1f}s"
    )


def extract_config(store_path: str, opts: dict[str, Any], ctx: click.Context) -> Any:
    """The ``ExtractConfig`` of ``extract``/``plan`` options (pops the ``--ig-*`` ones)."""
    from qcache.extract.inputs.datasets import DatasetRequest
    from qcache.extract.inputs.prompting import Prompting
    from qcache.extract.run.runner import ExtractConfig
    from qcache.store.errors import InvalidOption
    from qcache.store.location import local_dir

    # before anything is written: an empty --tap would create a run with no arrays at all
    if not flat(opts["taps"]):
        raise InvalidOption(
            "--tap was given an empty value, which names no tap point: pass act, down-in or resid (a comma "
            "list, e.g. --tap act,down-in), or leave it out for act"
        )
    if not str(opts["layers"]).strip(" ,"):
        raise InvalidOption(
            f"--layers {opts['layers']!r} names no layer: use 'paper', 'all' or a comma list like 1,15,32"
        )
    given = [f"--{name.replace('_', '-')}" for name in _given(ctx) if name.startswith("ig_")]
    if given and not opts["attributions"]:
        raise click.UsageError(f"{', '.join(given)} only apply with --attributions: add it, or drop them")
    ig = _ig_config(opts)
    quant = _method(opts, ctx)
    prompting = Prompting(opts["chat_template"], opts["system_prompt"])
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
    return ExtractConfig(
        model=opts["model"],
        bits=opts["bits"],
        quant=quant,
        store=local_dir(store_path),
        dataset=request,
        layers=opts["layers"],
        taps=flat(opts["taps"]),
        device=opts["device"],
        batch_size=opts["batch_size"],
        batching=opts["batching"],
        max_length=opts["max_length"],
        chunk_rows=opts["chunk_rows"],
        shard=parse_shard(opts.get("shard", "0/1")),
        overwrite=opts.get("overwrite", False),
        progress=not opts.get("quiet", False),
        disk_check=not opts.get("no_disk_check", False),
        attributions=ig if opts["attributions"] else None,
        label_scoring=opts["label_scoring"],
        prompting=prompting,
    )


def _method(opts: dict[str, Any], ctx: click.Context) -> str:
    """The run key of ``--quant`` or ``--bits`` with the method's settings (pops the setting options)."""
    from qcache.extract.quant.registry import resolve

    settings = {
        "threshold": opts.pop("int8_threshold"),
        "group_size": opts.pop("group_size"),
        "double_quant": opts.pop("double_quant"),
        "compute_dtype": opts.pop("compute_dtype"),
    }
    bits = opts["bits"] if "bits" in _given(ctx) else None
    return resolve(opts.pop("quant"), bits, settings).key


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _given(ctx: click.Context) -> set[str]:
    """Names of the options given on the command line (not defaults)."""
    return {
        name
        for name in ctx.params
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }


def _child_args(ctx: click.Context) -> list[str]:
    """This command's given options as a child's command line, less those the launcher sets itself."""
    args: list[str] = []
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in LAUNCHER_SETS or p.name not in _given(ctx):
            continue
        value = ctx.params[p.name]
        for v in value if p.multiple else [value]:
            if p.is_flag:  # an on/off pair (--double-quant/--no-double-quant) replays the side given
                args += [p.opts[0] if v or not p.secondary_opts else p.secondary_opts[0]]
            else:  # a CommaChoice gives a tuple, e.g. --tap act,down-in
                args += [p.opts[0], ",".join(v) if isinstance(v, tuple) else str(v)]
    return args


@click.command(
    epilog=examples(
        "qcache attribute boolq/smollm2-135m/nf4 --replace --device cpu",
        "qcache attribute boolq/llama2-7b/fp16 --ig-steps 20 --shard 0/2",
    )
)
@click.argument("run")
@click.option("--replace", is_flag=True, help="Re-extract a run without attributions (or other settings).")
@click.option("--model", default=None, help="Model directory, when the run's model was a local GGUF file.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--batch-size", type=int, default=None, help="Examples per forward pass  [default: the run's].")
@click.option("--shard", default="0/1", show_default=True, help="Fill only shard i of n (i/n).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@ig_options
@store_option
@clean_errors
def attribute(store_path: str, run: str, **opts: Any) -> None:
    """Add Integrated-Gradients attributions to an extracted RUN (DATASET/MODEL/QUANT); resumable."""
    from qcache.extract.attrib.reattribute import attribute_run
    from qcache.store.location import local_dir

    ig = _ig_config(opts)
    result = attribute_run(
        local_dir(store_path),
        run,
        ig,
        replace=opts["replace"],
        model=opts["model"],
        log=lambda msg: click.echo(msg, err=True),
        device=opts["device"],
        batch_size=opts["batch_size"],
        shard=parse_shard(opts["shard"]),
        progress=not opts["quiet"],
    )
    click.echo(
        f"{result.key}: {result.units_done}/{result.units_total} units done, "
        f"{result.tokens_written} tokens attributed in {result.seconds:.1f}s"
    )
