"""`qcache analyze salience`: salient neurons from stored attributions, and their overlaps."""

from __future__ import annotations

from typing import Any

import click

from .options import clean_errors, examples, layer_list, renamed, results_option, store_option
from .output import Table, emit, format_option

salience_threshold = click.option(
    "--salience-threshold",
    "threshold",
    type=float,
    default=0.8,
    show_default=True,
    help="Normalized attribution above which a neuron is salient (paper: 0.8; authors' code: 0.7).",
)


@click.command(
    "salience",
    epilog=examples(
        "qcache analyze salience",
        "qcache analyze salience boolq/llama2-7b/fp16 boolq/llama2-7b/nf4 --layers 15",
        "qcache analyze salience --salience-threshold 0.7 --repeated-tokens last --max-of signed",
    ),
)
@click.argument("runs", nargs=-1)
@salience_threshold
@renamed("--threshold", "threshold", float)
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
@format_option()
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
    fmt: str,
) -> None:
    """Salient neurons per layer and strategy from stored attributions (the paper's Table 3), and
    their overlap between quantizations of the same model. RUNS default to every run with attributions."""
    from qcache.store import RunKey, open_store

    st = open_store(store_path, results=results)
    keys = [RunKey.parse(r) for r in runs] or [k for k in st.runs() if st.run(k).manifest.get("attributions")]
    if not keys:
        none = f"store {store_path} holds no run with attributions (extract with --attributions)"
        emit(fmt, {"counts": Table(["run"], []), "overlap": Table(["dataset"], [])}, text=lambda: none)
        return
    found, pairs = compute_salience(
        st,
        keys,
        threshold=threshold,
        layers=layers,
        allow_partial=allow_partial,
        repeated_tokens=repeated_tokens,
        max_of=max_of,
    )
    tables = salience_tables(found, pairs)
    header = (
        f"salient neurons (normalized attribution > {threshold}, --repeated-tokens {repeated_tokens}, "
        f"--max-of {max_of}), distinct over each run's examples"
    )
    emit(fmt, tables, text=lambda: header + "\n" + salience_text(found, tables["overlap"]))


def compute_salience(
    store: Any, keys: list[Any], *, layers: str | None, **options: Any
) -> tuple[list[Any], Any]:
    """``analyze.salience`` of each run and their overlaps (a ``pyarrow.Table``), both written to the
    result tables; ``layers`` a comma list (None: every attributed layer)."""
    from qcache.analyze.salience import overlap, salience, write_tables

    chosen = list(layer_list(layers)) if layers else None
    found = [salience(store.run(k), layers=chosen, **options) for k in keys]
    pairs = overlap(found)
    write_tables(store.results, found, pairs)
    return found, pairs


def salience_tables(found: list[Any], pairs: Any) -> dict[str, Table]:
    """The ``counts`` (one row per run, layer and strategy) and ``overlap`` tables of salience results."""
    counts = [{"run": str(r.run.key), **row} for r in found for row in r.counts.to_pylist()]
    columns = ["run", *(found[0].counts.column_names if found else [])]
    return {"counts": Table(columns, counts), "overlap": Table.from_arrow(pairs)}


def salience_text(found: list[Any], pairs: Table) -> str:
    """Salient-neuron counts per run and layer by strategy, then the overlaps of the union sets."""
    heads = " ".join(f"{h:>6}" for h in ("union", "best", "sum", "max", "mean"))
    lines = [f"{'dataset/model/quant':<40} {'layer':>5} {heads}"]
    for r in found:
        by = {(row["layer"], row["strategy"]): row["n_salient"] for row in r.counts.to_pylist()}
        for layer in sorted({row["layer"] for row in r.counts.to_pylist()}):
            cells = " ".join(f"{by[(layer, s)]:>6}" for s in ("union", "best_token", "sum", "max", "mean"))
            lines.append(f"{r.run.key!s:<40} {layer:>5} {cells}")
    union = [row for row in pairs.rows if row.get("strategy") == "union"]
    if union:
        lines.append("overlap of the union sets between quantizations")
        for row in union:
            lines.append(
                f"{row['dataset']}/{row['model']} L{row['layer']:<4} {row['quant_a']:>5} vs "
                f"{row['quant_b']:<5} shared {row['n_shared']:>5} of {row['n_a']}/{row['n_b']}  "
                f"jaccard {row['jaccard']:.3f}"
            )
    return "\n".join(lines)
