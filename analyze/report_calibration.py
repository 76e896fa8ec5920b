"""The report's calibration sections: accuracy (Figure 1, with Wilson intervals, the majority-class
baseline and the label words' probability mass), average confidence (Figure 2), ACE (Figure 3) and the
reliability diagrams, all from the ``metrics``, ``reliability`` and ``predictions`` tables."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from . import figures
from . import report_accuracy as accuracy_data
from .page import Page, lacking, load_table, pivot, quant_key, rows_of, run_order

METRIC_ORDER = (
    "n_examples",
    "accuracy",
    "avg_confidence",
    "ace",
    "ace_ties_kept",
    "ace_classwise",
    "ece",
    "brier",
)


def calibration_section(page: Page, reading: str) -> None:
    """Figures 1-3, the label words' mass and the reliability diagrams, from the calibration tables."""
    acc = page.section("accuracy", "Accuracy (Figure 1)")
    conf = page.section("confidence", "Average confidence (Figure 2)")
    cal = page.section("calibration", "Calibration: ACE (Figure 3) and reliability diagrams")
    metrics = load_table(page.store.results, "metrics")
    if metrics is None:
        acc.append(
            page.gap(
                "no calibration tables (metrics, reliability): run qcache analyze calibration "
                "(or qcache report --analyze)"
            )
        )
        return
    rows = [r for r in rows_of(metrics) if r["reading"] == reading]
    models = {r["model"] for r in rows}
    for parts in (acc, conf, cal):
        parts.append(page.notes(models))
    quants = sorted({r["quant"] for r in rows}, key=quant_key)
    predictions = load_table(page.store.results, "predictions")
    accuracy = accuracy_data.accuracy_rows(rows, predictions)
    for parts, metric, name, label, lim in (
        (acc, "accuracy", "fig1_accuracy", "accuracy", (0.0, 1.0)),
        (conf, "avg_confidence", "fig2_confidence", "average confidence", (0.0, 1.0)),
        (cal, "ace", "fig3_ace", "ACE (lower is better)", None),
    ):
        panels: dict[str, dict[str, dict[str, float]]] = {}
        for r in rows:
            if r["metric"] == metric:
                panels.setdefault(r["dataset"], {}).setdefault(r["model"], {})[r["quant"]] = r["value"]
        caption = f"{label.capitalize()} per quantization, one bar per model, from 0 ({reading} reading)."
        ci: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
        base: dict[str, dict[str, dict[str, float]]] = {}
        if metric == "accuracy":
            for r in accuracy:
                ci.setdefault(r["dataset"], {}).setdefault(r["model"], {})[r["quant"]] = (
                    r["ci_low"],
                    r["ci_high"],
                )
                if r["majority_baseline"] == r["majority_baseline"]:  # not NaN
                    by_model = base.setdefault(r["dataset"], {}).setdefault(r["model"], {})
                    by_model[r["quant"]] = r["majority_baseline"]
            caption += (
                f" Error bars: {accuracy_data.CONFIDENCE:.0%} Wilson intervals; dashed: the majority-class "
                "baseline (always answering the most frequent gold label of the run's examples)."
            )
        png = figures.quant_bars(panels, quants, ylabel=label, ylim=lim, intervals=ci, baselines=base)
        parts.append(page.figure(name, png, caption))
        if metric == "accuracy" and accuracy:
            parts.append(
                page.table(
                    "fig1_accuracy_data",
                    pa.Table.from_pylist(sorted(accuracy, key=run_order)),
                    "Accuracy per run with its Wilson interval and the majority-class baseline.",
                )
            )
            parts.extend(_label_mass(page, predictions))
    summary = pivot(rows, "metric", "value", prefix="", order=METRIC_ORDER)
    caption = f"Every calibration metric per run ({reading} reading)."
    acc.append(page.table("calibration_summary", summary, caption))
    acc.append(lacking(page, metrics, "calibration", "qcache analyze calibration"))
    panels_r: dict[str, dict[str, Any]] = {}
    reliability = load_table(page.store.results, "reliability")
    rel = [r for r in rows_of(reliability) if r["reading"] == reading and r["count"]]
    for r in sorted(rel, key=run_order):
        panel = panels_r.setdefault(f"{r['dataset']} / {r['model']}", {})
        conf_acc = panel.setdefault(r["quant"], ([], [], []))
        for lst, v in zip(conf_acc, (r["confidence"], r["accuracy"], r["count"]), strict=True):
            lst.append(v)
    if panels_r:
        cal.append(
            page.figure(
                "reliability",
                figures.reliability(panels_r),
                "Reliability diagrams: accuracy against mean confidence per bin (marker size: "
                "examples in the bin); the dashed diagonal is perfect calibration.",
            )
        )
    cal.append(page.table("metrics", metrics, "The metrics table, both readings.", show=False))
    if reliability is not None:
        cal.append(page.table("reliability", reliability, "Reliability bins.", show=False))


def _label_mass(page: Page, predictions: pa.Table | None) -> list[str]:
    """How much of the next-token probability the label words hold, per run: a model whose mass is small
    is not really answering, whatever its renormalized (paper) reading says."""
    masses = accuracy_data.label_masses(predictions)
    if not masses:
        return []
    panels: dict[str, dict[str, np.ndarray]] = {}
    for (dataset, model, quant), m in sorted(
        masses.items(), key=lambda kv: (*kv[0][:2], quant_key(kv[0][2]))
    ):
        panels.setdefault(dataset, {})[f"{model} {quant}"] = m
    summary = accuracy_data.mass_rows(masses)
    return [
        page.figure(
            "label_mass",
            figures.mass_boxes(panels),
            "Probability the label words hold together at the answer position (sum of label_prob over the "
            "labels, full vocabulary), per example: box = quartiles, whiskers = 5th-95th percentiles. "
            "Near 0 the model is mostly predicting other tokens.",
        ),
        page.table(
            "label_mass",
            pa.Table.from_pylist(sorted(summary, key=run_order)),
            "Label words' probability mass per run (frac_below_half: share of examples under 0.5).",
        ),
    ]
