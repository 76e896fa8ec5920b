"""The data behind the report's accuracy figure: intervals, the majority-class baseline, label-word mass.

With n = 200 examples a run's accuracy is uncertain by about +-0.07, and a model that always answers the
majority label scores its share of the examples; neither shows in a bare accuracy. A model whose label
words hold little of the next-token probability is not really answering the question, whatever its
renormalized reading says. These functions compute the three per run from the result tables, as plain
rows (written next to the figure as CSVs); ``figures.quant_bars`` and ``figures.mass_boxes`` draw them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from qcache.store.errors import BackendUnavailable

CONFIDENCE = 0.95


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (Wilson 1927), via SciPy's
    ``binomtest(k, n).proportion_ci(method="wilson")``. ``(nan, nan)`` when ``n`` is 0.

    Raises BackendUnavailable when SciPy is not installed."""
    if n <= 0:
        return float("nan"), float("nan")
    try:
        from scipy.stats import binomtest  # imported here: only the report needs SciPy
    except ImportError as exc:  # a base dependency, but an older install may lack it
        raise BackendUnavailable("qcache report needs scipy for its intervals: pip install scipy") from exc

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _by_run(table: pa.Table | None) -> dict[tuple[str, str, str], pa.Table]:
    if table is None or not table.num_rows:
        return {}
    keys = zip(*(table[c].to_pylist() for c in ("dataset", "model", "quant")), strict=True)
    rows: dict[tuple[str, str, str], list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    return {k: table.take(pa.array(v)) for k, v in rows.items()}


def accuracy_rows(
    metric_rows: list[dict[str, Any]], predictions: pa.Table | None, confidence: float = CONFIDENCE
) -> list[dict[str, Any]]:
    """One row per run with an ``accuracy`` metric among ``metric_rows`` (one reading's ``metrics`` rows):
    dataset, model, quant, n (examples), n_correct, accuracy, ci_low, ci_high (Wilson, ``confidence``),
    majority_label (the most frequent gold label index, from ``predictions``) and majority_baseline (its
    share of the run's examples: the accuracy of always answering it; NaN without predictions)."""
    per_run: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in metric_rows:
        per_run.setdefault((r["dataset"], r["model"], r["quant"]), {})[r["metric"]] = r["value"]
    preds = _by_run(predictions)
    out = []
    for key, m in per_run.items():
        if "accuracy" not in m:
            continue
        gold = preds[key]["gold"].to_numpy() if key in preds else np.zeros(0, np.int64)
        n = int(m["n_examples"]) if "n_examples" in m else len(gold)
        k = round(m["accuracy"] * n)  # accuracy is k / n
        lo, hi = wilson_interval(k, n, confidence)
        counts = np.bincount(gold.astype(np.int64)) if gold.size else np.zeros(0, np.int64)
        out.append(
            {
                "dataset": key[0],
                "model": key[1],
                "quant": key[2],
                "n": n,
                "n_correct": k,
                "accuracy": m["accuracy"],
                "ci_low": lo,
                "ci_high": hi,
                "majority_label": int(counts.argmax()) if counts.size else -1,
                "majority_baseline": float(counts.max() / gold.size) if counts.size else float("nan"),
            }
        )
    return out


def label_masses(predictions: pa.Table | None) -> dict[tuple[str, str, str], np.ndarray]:
    """Per run, ``(examples,)`` float64: the full-vocabulary probability the label words hold together,
    sum over labels of ``label_prob`` (each label's spelling variants already summed)."""
    out = {}
    for key, t in _by_run(predictions).items():
        probs = t["label_prob"].to_numpy(zero_copy_only=False)
        out[key] = np.array([float(np.sum(p, dtype=np.float64)) for p in probs])
    return out


def mass_rows(masses: dict[tuple[str, str, str], np.ndarray]) -> list[dict[str, Any]]:
    """Summary per run of ``label_masses``: n, median, p10, p90, min and the share below 0.5."""
    rows = []
    for (dataset, model, quant), m in masses.items():
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "quant": quant,
                "n": int(m.size),
                "mass_median": float(np.median(m)) if m.size else float("nan"),
                "mass_p10": float(np.quantile(m, 0.1)) if m.size else float("nan"),
                "mass_p90": float(np.quantile(m, 0.9)) if m.size else float("nan"),
                "mass_min": float(m.min()) if m.size else float("nan"),
                "frac_below_half": float(np.mean(m < 0.5)) if m.size else float("nan"),
            }
        )
    return rows
