"""`qcache compare`: every quantization method of a model against a baseline, ranked (CPU only, no model)."""

from __future__ import annotations

from typing import Any

import click

from .analysis import log
from .options import clean_errors, examples, results_option, store_option
from .output import Table, aligned, emit, format_option

SHOWN = (
    "rank",
    "dataset",
    "model",
    "baseline",
    "quant",
    "accuracy",
    "accuracy_change",
    "flip_share",
    "ace_change",
    "ece_change",
    "brier_change",
    "cka_mean",
    "cka_min",
    "r_median",
    "share_r_below_0_9",
    "dead_jaccard",
    "salient_jaccard",
)
FINE = ("cka_mean", "cka_min", "cka_debiased_mean", "r_median")  # near 1: shown to 6 decimals


@click.command(
    "compare",
    epilog=examples(
        "qcache compare",
        "qcache compare --baseline fp32 --model smollm2-135m --layers 1,15,30",
        "qcache compare --debiased --format json",
    ),
)
@click.option(
    "--baseline",
    default=None,
    help="Quantization key every other run is compared with (default: fp16, else fp32).",
)
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--model", default=None, help="Only this model key.")
@click.option("--layers", default=None, help="Comma list of layers cached in both runs (default: all such).")
@click.option(
    "--tap",
    type=click.Choice(["act", "down-in", "resid"]),
    default="act",
    show_default=True,
    help="Which cached tap point to compare.",
)
@click.option(
    "--reading",
    type=click.Choice(["paper", "authors"]),
    default="paper",
    show_default=True,
    help="Answer reading of accuracy, flips and calibration.",
)
@click.option("--ranges", "n_ranges", type=int, default=10, show_default=True, help="ACE ranges R.")
@click.option("--debiased", is_flag=True, help="Also the debiased linear CKA (one more pass over both runs).")
@click.option(
    "--precision",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="Products of the CKA Grams (float64 sums either way); float64 is about 2.5x slower.",
)
@click.option("--scheduler", default=None, help="threads (default), sync, local-cluster, or tcp://HOST:PORT.")
@click.option(
    "--memory-limit", default=None, help="Working-memory bound of the CKA Grams, e.g. 4GB (default 4 GiB)."
)
@format_option("Output: the ranked table to read, or JSON / CSV of the methods and per-layer tables.")
@store_option
@results_option
@clean_errors
def compare(store_path: str, results: str | None, fmt: str, **opts: Any) -> None:
    """Rank every quantization method of a dataset/model by how little it changed the model against the
    baseline on the same tokens: answers (accuracy, flips, ACE/ECE/Brier), per-layer linear CKA, per-neuron
    r, dead and salient set overlap. Writes the method_comparison tables (see `qcache sql`)."""
    from qcache.analyze.compare import RANK_RULE, CompareConfig
    from qcache.analyze.compare import compare as run_compare
    from qcache.analyze.scheduler import parse_memory
    from qcache.store import open_store

    layers = None
    if opts["layers"]:
        try:
            layers = tuple(int(x) for x in opts["layers"].split(","))
        except ValueError:
            bad = opts["layers"]
            raise click.BadParameter(f"--layers {bad!r} is not a comma list like 1,15,30") from None
    cfg = CompareConfig(
        store=open_store(store_path, results=results),
        layers=layers,
        memory_limit=parse_memory(opts.pop("memory_limit")),
        **{k: v for k, v in opts.items() if k != "layers"},
    )
    methods, per_layer = run_compare(cfg, log=log)
    tables = {"methods": Table.from_arrow(methods), "layers": Table.from_arrow(per_layer)}

    def text() -> str:
        # a method not compared was said once, before the table, as it was passed over (log)
        return "\n".join([aligned(Table.from_arrow(_shown(methods))), f"ranked by {RANK_RULE}"])

    emit(fmt, tables, text=text)


def _shown(table: Any) -> Any:
    """The printed columns as text: CKA and r to 6 decimals (they sit near 1), the rest to 4."""
    import pyarrow as pa

    def text(c: str, v: Any) -> str:
        if v is None:
            return "-"
        if not isinstance(v, float):
            return str(v)
        if v != v:
            return "nan"
        return f"{v:.6f}" if c in FINE else f"{v:+.4f}" if "change" in c else f"{v:.4f}"

    return pa.table({c: [text(c, v) for v in table[c].to_pylist()] for c in SHOWN})
