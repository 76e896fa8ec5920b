"""`qcache extract` and `qcache attribute`: the GPU-node side (torch is imported only when they run)."""

from __future__ import annotations

from typing import Any

import click

from .options import CommaChoice, clean_errors, examples, flat, stacked, store_option


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"{value!r}: need 0 <= i < n")
    return i, n


# The ``--ig-*`` options of Integrated-Gradients attributions (defaults: the authors' code).
ig_options = stacked(
    [
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
)


# What to extract: the options `qcache extract` and `qcache plan` share.
run_options = stacked(
    [
        click.option(
            "--model", required=True, help="Alias (see `qcache models`), Hugging Face id, or local directory."
        ),
        click.option(
            "--bits", type=int, default=16, show_default=True, help="32, 16, 8 (LLM.int8) or 4 (NF4)."
        ),
        click.option(
            "--quant",
            default=None,
            help="Quantization method instead of --bits, by name or run key (`qcache methods`), e.g. bf16, "
            "fp4, torchao-int8wo, torchao-w8a8, hqq4, gguf-q4_0, fp8-e4m3, int8-t4.0.",
        ),
        click.option(
            "--int8-threshold", type=float, default=None, help="LLM.int8's outlier threshold  [int8: 6.0]."
        ),
        click.option(
            "--group-size",
            type=int,
            default=None,
            help="Weights per quantization group  [hqq*: 64; torchao-int4wo: 128].",
        ),
        click.option(
            "--double-quant/--no-double-quant",
            default=None,
            help="Quantize NF4/FP4's block scales again  [nf4, fp4: on].",
        ),
        click.option(
            "--compute-dtype",
            type=click.Choice(["float16", "bfloat16", "float32"]),
            default=None,
            help="Activations and unquantized weights of a quantized method  [float16; torchao: bfloat16].",
        ),
        click.option(
            "--dataset",
            default="boolq",
            show_default=True,
            help="boolq, toxicity (jigsaw), piqa, hellaswag, a local .jsonl/.csv/.parquet, or hf:ORG/NAME.",
        ),
        click.option("--limit", type=int, default=None, help="Sample this many examples (seeded)."),
        click.option(
            "--seed", type=int, default=42, show_default=True, help="Sampling seed (the paper's is 42)."
        ),
        click.option(
            "--split", default="all", show_default=True, help="Dataset split (boolq: train, validation, all)."
        ),
        click.option(
            "--with-passage", is_flag=True, help="BoolQ with its passage in the prompt (full BoolQ)."
        ),
        click.option("--text-field", default=None, help="Text column of a local/Hub dataset."),
        click.option("--label-field", default=None, help="Gold label column of a local/Hub dataset."),
        click.option("--labels", default=None, help="Comma-separated label words, e.g. False,True."),
        click.option("--template", default=None, help="Prompt template with {text}, for local/Hub datasets."),
        click.option(
            "--label-scoring",
            type=click.Choice(["first-token", "sequence"]),
            default="first-token",
            show_default=True,
            help="Read each label word by its first token's probability (the paper's), or by the "
            "log-likelihood of its whole token sequence after the prompt (lm-evaluation-harness's).",
        ),
        click.option(
            "--chat-template",
            is_flag=True,
            help="Send each prompt as the user turn of the tokenizer's chat template, generation prompt "
            "appended (as lm-eval's --apply_chat_template); runs are keyed DATASET-chat.",
        ),
        click.option(
            "--system-prompt",
            default=None,
            help="With --chat-template: a system turn before each prompt (default: the template's own).",
        ),
        click.option(
            "--layers", default="paper", show_default=True, help="'paper' (1, 15, last), 'all', or 1,15,32."
        ),
        click.option(
            "--tap",
            "taps",
            multiple=True,
            type=CommaChoice(["act", "down-in", "resid"]),
            default=("act",),
            show_default=True,
            help="Tap point(s), a comma list or repeated: activation output, the down projection's input, "
            "or the layer's output hidden state (resid).",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ..."),
        click.option(
            "--batching",
            type=click.Choice(["length-sorted", "authors"]),
            default="length-sorted",
            show_default=True,
            help="Each unit's examples by length, right-padded; or the authors' consecutive batches, "
            "left-padded with EOS, positions as their generate call (to reproduce their LLM.int8 numbers).",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=None,
            help="Examples per forward pass  [default: a resumed run's; else 16, on CUDA 64 (but 16 for "
            "weight+activation methods such as LLM.int8, whose values depend on the batch); 32 with "
            "--batching authors].",
        ),
        click.option(
            "--max-length", type=int, default=512, show_default=True, help="Longer prompts lose their front."
        ),
        click.option(
            "--chunk-rows", type=int, default=1024, show_default=True, help="Token rows per chunk and unit."
        ),
    ]
)
attributions_option = click.option(
    "--attributions", is_flag=True, help="Also cache Integrated-Gradients attributions (float32)."
)


# Options of the launcher: any of them makes `qcache extract` start one child process per device.
LAUNCHER = ("gpus", "processes", "node")
# What the launcher passes to each child itself (or keeps to the parent), not copied from the command line.
LAUNCHER_SETS = {*LAUNCHER, "shard", "device", "quiet", "overwrite", "store_path"}
launcher_options = stacked(
    [
        click.option(
            "--gpus",
            default=None,
            help="Launch one child per GPU (0,1,2,3 or all), each filling its own shard of the run.",
        ),
        click.option(
            "--processes",
            type=int,
            default=None,
            help="Launch N CPU children, each filling its own shard with cores/N threads.",
        ),
        click.option(
            "--node",
            default=None,
            help="With --gpus/--processes: this is node K of M (K/M); its g children fill shards "
            "K*g..K*g+g-1 of M*g.",
        ),
    ]
)


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
        shard=_parse_shard(opts.get("shard", "0/1")),
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
        shard=_parse_shard(opts["shard"]),
        progress=not opts["quiet"],
    )
    click.echo(
        f"{result.key}: {result.units_done}/{result.units_total} units done, "
        f"{result.tokens_written} tokens attributed in {result.seconds:.1f}s"
    )
