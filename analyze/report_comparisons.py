"""The report's comparisons beyond the paper: salient/dead set overlap and per-neuron activation drift."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import drift as drift_mod
from . import figures
from .page import Page, groups, load_table, rows_of


def overlap(page: Page) -> None:
    title = "Overlap of salient and dead sets across quantizations (beyond the paper)"
    parts = page.section("overlap", title)
    multi = {g: q for g, q in groups(page.store).items() if len(q) > 1}
    if not multi:
        parts.append(
            page.gap(
                "no dataset/model with two or more quantizations: overlaps and drift need a "
                "second run, e.g. qcache extract --bits 4 with the same model and dataset"
            )
        )
        return
    dead_ov = load_table(page.store.results, "dead_overlap")
    if dead_ov is None:
        parts.append(
            page.gap(
                "no dead_overlap table: needs dead-neuron statistics of two quantizations "
                "of one model (qcache analyze dead), then qcache report --analyze"
            )
        )
    else:
        parts.append(page.notes({r["model"] for r in rows_of(dead_ov)}))
        parts.append(
            page.table(
                "dead_overlap",
                dead_ov,
                "Dead-neuron sets of two quantizations per layer: "
                "sizes, shared neurons and Jaccard index (NaN: both sets empty).",
            )
        )
    sal = load_table(page.store.results, "salience_overlap")
    if not any(page.store.run(k).manifest.get("attributions") for k in page.store.runs()):
        parts.append("<p>Salient-set overlap needs attributions: see the salient neurons section.</p>")
    elif sal is None or "strategy" not in sal.column_names:
        parts.append(
            page.gap(
                "no salience_overlap table: needs attributions in two quantizations of a model "
                "(qcache extract --attributions), then qcache analyze salience"
            )
        )
    else:
        union = pa.Table.from_pylist([r for r in rows_of(sal) if r["strategy"] == "union"])
        parts.append(
            page.table(
                "salience_overlap_union",
                union,
                "Salient-neuron sets (union of strategies) "
                "of two quantizations per layer: sizes, shared neurons and Jaccard index.",
            )
        )
        parts.append(page.table("salience_overlap", sal, "Every strategy.", show=False))


def drift(page: Page) -> None:
    parts = page.section("drift", "Activation drift from the baseline, per neuron (beyond the paper)")
    table = load_table(page.store.results, "activation_drift")
    skipped = rows_of(load_table(page.store.results, "drift_skipped"))
    for r in skipped:
        parts.append(
            page.gap(
                f"drift {r['dataset']}/{r['model']} {r['baseline']} -> {r['quant']} skipped: {r['reason']}"
            )
        )
    done = {(r["dataset"], r["model"], r["quant"]) for r in skipped}
    if table is not None:
        cols = table.select(["dataset", "model", "quant"]).to_pylist()
        done |= {(r["dataset"], r["model"], r["quant"]) for r in cols}
    for (ds, model), quants in groups(page.store).items():
        base = next((b for b in ("fp16", "fp32") if b in quants), None)
        todo = [q for q in quants if q != base and (ds, model, q) not in done]
        if len(quants) > 1 and base is None:
            parts.append(page.gap(f"{ds}/{model} has no fp16 or fp32 baseline run: no drift"))
        elif todo:
            parts.append(
                page.gap(
                    f"no drift of {ds}/{model} {', '.join(todo)} from {base}: "
                    "run qcache analyze drift (or qcache report --analyze)"
                )
            )
    if table is None:
        return
    for ds, model, base, quant, n, now in drift_mod.drift_partial(page.store, table):
        parts.append(
            page.gap(
                f"drift {ds}/{model} {base} -> {quant} was computed on {n} tokens (--allow-partial), the "
                f"runs have {now} now: it is out of date; run qcache analyze drift (or qcache report "
                "--analyze)"
            )
        )
    d = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    parts.append(page.notes(set(d["model"].tolist())))
    panels: dict[str, dict[str, np.ndarray]] = {}
    summary = drift_mod.summarize(table)
    for row in summary.to_pylist():
        ds, model, quant, layer = row["dataset"], row["model"], row["quant"], row["layer"]
        m = (d["dataset"] == ds) & (d["model"] == model) & (d["quant"] == quant) & (d["layer"] == layer)
        panels.setdefault(f"{ds} / {model} L{layer} (vs {row['baseline']})", {})[quant] = d["r"][m]
    parts.append(
        page.figure(
            "drift_r",
            figures.drift_hist(panels),
            "Per-neuron Pearson r between baseline and quantized activations on the same "
            "tokens (one curve per quantization; r near 1: the neuron's activation pattern "
            "survived).",
        )
    )
    parts.append(
        page.table(
            "drift_summary",
            summary,
            "Per layer: median and 5th percentile of per-neuron r, share of neurons with "
            "r < 0.9, median mean-absolute difference and median relative RMS difference.",
        )
    )
    parts.append(page.table("activation_drift", table, "Per-neuron drift.", show=False))
