"""The report's "methods side by side" section, from the ``method_comparison`` tables (``qcache compare``).

A ranked table per dataset, model and baseline, then one figure per metric: per-layer metrics (linear CKA,
median per-neuron r, share of neurons with r < 0.9, dead and salient Jaccard) as one line per method over
the layers, answer metrics (accuracy change, flip share, ACE/ECE/Brier change) as one bar per method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from qcache.store import Store
from qcache.store.errors import QCacheError
from qcache.store.tables import part_name, table_parts

from . import figures
from .page import Page, groups, load_table, quant_key, rows_of

Log = Callable[[str], None]
RANKED = (
    "dataset",
    "model",
    "baseline",
    "rank",
    "quant",
    "accuracy",
    "accuracy_change",
    "flip_share",
    "ace_change",
    "ece_change",
    "brier_change",
    "cka_mean",
    "cka_min",
    "cka_min_layer",
    "r_median",
    "share_r_below_0_9",
    "dead_jaccard",
    "salient_jaccard",
)
LAYER_METRICS = (
    (
        "cka",
        "linear CKA with the baseline",
        "Linear CKA (Kornblith et al. 2019) of each layer with the baseline",
    ),
    ("r_median", "median per-neuron r", "Median over neurons of the Pearson r with the baseline"),
    (
        "share_r_below_0_9",
        "share of neurons with r < 0.9",
        "Share of neurons whose r with the baseline is < 0.9",
    ),
    ("dead_jaccard", "Jaccard of dead sets", "Jaccard index of the dead-neuron sets of method and baseline"),
    ("salient_jaccard", "Jaccard of salient sets", "Jaccard index of the salient-neuron sets (union)"),
)
METHOD_METRICS = (
    ("accuracy_change", "accuracy change", "Accuracy of each method minus the baseline's"),
    ("flip_share", "share of answers flipped", "Share of examples whose predicted answer differs"),
    ("ace_change", "ACE change", "ACE (the paper's, authors' range split) minus the baseline's"),
    ("ece_change", "ECE change", "ECE minus the baseline's"),
    ("brier_change", "Brier change", "Brier score minus the baseline's"),
)


def methods(page: Page) -> None:
    """Write the section (or name what it lacks)."""
    parts = page.section("methods", "Quantization methods side by side (beyond the paper)")
    table = load_table(page.store.results, "method_comparison")
    layers = load_table(page.store.results, "method_comparison_layers")
    multi = {g for g, q in groups(page.store).items() if len(q) > 1}
    if table is None:
        if multi:
            parts.append(page.gap("no method comparison: run qcache compare (or qcache report --analyze)"))
        else:
            parts.append("<p>Comparing methods needs two or more runs of one dataset and model.</p>")
        return
    rows = sorted(rows_of(table), key=lambda r: (r["dataset"], r["model"], r["baseline"], r["rank"] or 10**9))
    parts.append(page.notes({r["model"] for r in rows}))
    for r in rows:
        if r["skipped"]:
            parts.append(page.gap(f"{r['dataset']}/{r['model']}/{r['quant']} not compared: {r['skipped']}"))
    for text in stale(page.store, rows):
        parts.append(page.gap(text))
    ranked = pa.Table.from_pylist([{c: r[c] for c in RANKED} for r in rows if not r["skipped"]])
    if ranked.num_rows:
        parts.append(
            page.table(
                "methods_ranked",
                ranked,
                "Methods ranked by mean linear CKA over layers (rounded to 4 decimals) with the "
                "baseline on the same tokens; ties: smaller flip share, then smaller |accuracy change|. "
                "Changes are method minus baseline; r_median and share_r_below_0_9 pool every neuron of "
                "the compared layers; "
                "Jaccard indices are means over layers where both sets exist.",
            )
        )
    panels = _method_panels(rows)
    for name, label, caption in METHOD_METRICS:
        data = {t: {q: v.get(name) for q, v in s.items()} for t, s in panels.items()}
        if any(v is not None and np.isfinite(v) for s in data.values() for v in s.values()):
            parts.append(
                page.figure(f"methods_{name}", figures.method_bars(data, ylabel=label), f"{caption}.")
            )
    lrows = rows_of(layers)
    for name, label, caption in LAYER_METRICS:
        data = _layer_panels(lrows, name)
        if data:
            parts.append(
                page.figure(f"methods_{name}", figures.layer_lines(data, ylabel=label), f"{caption}.")
            )
    parts.append(page.table("method_comparison", table, "The method_comparison table.", show=False))
    if layers is not None:
        parts.append(page.table("method_comparison_layers", layers, "Per method and layer.", show=False))


def _title(r: dict[str, Any]) -> str:
    return f"{r['dataset']} / {r['model']} (vs {r['baseline']})"


def _method_panels(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if not r["skipped"]:
            out.setdefault(_title(r), {})[r["quant"]] = r
    return out


def _layer_panels(rows: list[dict[str, Any]], name: str) -> dict[str, dict[str, dict[int, float]]]:
    """``{panel: {quant: {layer: value}}}`` of one per-layer metric, only where some value is finite."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in sorted(rows, key=lambda r: (r["dataset"], r["model"], quant_key(r["quant"]), r["layer"])):
        v = r.get(name)
        if v is not None and np.isfinite(v):
            out.setdefault(_title(r), {}).setdefault(r["quant"], {})[int(r["layer"])] = float(v)
    return out


def stale(store: Store, rows: list[dict[str, Any]]) -> list[str]:
    """Comparisons computed from an earlier creation of one of their runs (re-extracted since)."""
    out = []
    for r in rows:
        for quant, rid in ((r["baseline"], r.get("base_run_id")), (r["quant"], r.get("run_id"))):
            key = f"{r['dataset']}/{r['model']}/{quant}"
            try:
                current = store.run(key).creation_id
            except QCacheError:  # a run deleted (or renamed) since
                current = None
            if rid is not None and current != rid:
                pair = f"{r['quant']} with {r['baseline']} ({r['dataset']}/{r['model']})"
                out.append(f"the comparison of {pair} predates the current {key}: rerun qcache compare")
                break
    return out


def analyze_comparison(store: Store, log: Log = print) -> None:
    """Run ``qcache compare`` for each dataset/model with a baseline and another run whose comparison is
    missing or stale (``qcache report --analyze``)."""
    from .compare import CompareConfig, compare
    from .drift import baseline_of

    done = {p.name for p in table_parts(store.results, "method_comparison")}
    current = rows_of(load_table(store.results, "method_comparison"))
    for (dataset, model), quants in groups(store).items():
        base = baseline_of(quants)
        if base is None or len(quants) < 2:
            continue
        runs = [store.run(f"{dataset}/{model}/{q}") for q in quants]
        if not all(r.complete for r in runs):
            log(f"{dataset}/{model}: method comparison waits for every run to finish extracting")
            continue
        mine = [r for r in current if (r["dataset"], r["model"], r["baseline"]) == (dataset, model, base)]
        fresh = part_name(dataset, model, None, f"vs-{base}") in done and not stale(store, mine)
        if fresh and {r["quant"] for r in mine} == set(quants) - {base}:
            continue
        try:
            compare(CompareConfig(store=store, dataset=dataset, model=model, baseline=base), log=log)
        except QCacheError as exc:  # e.g. a tap cached in one run only: the report names the gap
            log(f"{dataset}/{model}: methods not compared: {exc}")
