"""The options of `qcache extract`, `qcache plan` and `qcache attribute`: what a run is (model, method,
data, layers, taps), its attributions and how it is launched."""

from __future__ import annotations

import click

from .options import CommaChoice, stacked


def parse_shard(value: str) -> tuple[int, int]:
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
