"""Quantization methods side by side (``qcache compare``): which one changed the model least, and where.

For one dataset and model, every run other than the baseline (any quantization key of the store) is
compared with the baseline run on the same tokens (their token index must be identical, else the method
is skipped with the reason):

* answers: accuracy and its change, the share of examples whose predicted answer flips (``paper``
  reading: the predicted label; ``authors``: the full-vocabulary argmax token), and the change of ACE (the
  paper's, the authors' range split), ECE and Brier (``analyze.calibration``);
* per layer: linear CKA (``analyze.cka``; debiased too on request), the median per-neuron Pearson r and
  the share of neurons with r < 0.9 (``analyze.drift.layer_drift``), and the Jaccard index of the dead
  and of the salient neuron sets where both runs have current ``neuron_stats`` / ``salient_neurons``.

Ranking (``RANK_RULE``): mean linear CKA over the compared layers rounded to 4 decimals, highest first
(differences below 1e-4 are ties, well above the float32 products' ~1e-7); ties go to the smaller flip
share, then the smaller |accuracy change|, then the method's name. A method without a CKA ranks last.

Tables (one part per dataset, model and baseline, ``<dataset>--<model>--vs-<baseline>.parquet``):
``method_comparison`` (one row per method, ``METHOD_COLUMNS``) and ``method_comparison_layers`` (one per
method and layer, ``LAYER_COLUMNS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qcache.store import Run, Store, open_store
from qcache.store.errors import InvalidOption, RunNotFound
from qcache.store.keys import QUANTS
from qcache.store.tables import SCHEMAS, part_name, write_table

from . import calibration, gram_terms
from .cka import SelfTerms, linear_cka, recorded_terms
from .compare_sets import neuron_sets
from .drift import baseline_of, layer_drift, mismatch
from .experts import dense_layers, no_dense_layer
from .scheduler import scheduler

Log = Callable[[str], None]
RANK_RULE = (
    "mean linear CKA over layers (rounded to 4 decimals) highest first; ties: smaller flip share, "
    "then smaller |accuracy change|, then name"
)
METHOD_COLUMNS = SCHEMAS["method_comparison"].split(", ")
LAYER_COLUMNS = SCHEMAS["method_comparison_layers"].split(", ")
FLIP_COLUMN = {"paper": "pred_label", "authors": "top_token_id"}


@dataclass(frozen=True)
class CompareConfig:
    """What ``qcache compare`` compares, and how."""

    store: Store | str | Path  # a Store, or a directory or URL to open
    baseline: str | None = None  # default: fp16, else fp32 (as drift)
    dataset: str | None = None
    model: str | None = None
    layers: tuple[int, ...] | None = None
    tap: str = "act"
    reading: str = "paper"
    n_ranges: int = 10
    debiased: bool = False
    precision: str = "float32"
    scheduler: str | None = None
    memory_limit: int | None = None


def compare(cfg: CompareConfig, log: Log = print) -> tuple[pa.Table, pa.Table]:
    """Compare every method with the baseline per dataset and model; write and return both tables.

    Raises:
        RunNotFound: no dataset/model matches the filters, or none has the baseline and another run.
        InvalidOption: an unknown reading, or ``--layers`` not cached in a compared pair.
    """
    if cfg.reading not in FLIP_COLUMN:
        raise InvalidOption(f"--reading {cfg.reading!r} is unknown: use paper or authors")
    store = open_store(cfg.store)
    groups: dict[tuple[str, str], dict[str, Run]] = {}
    for k in store.select(dataset=cfg.dataset, model=cfg.model):
        groups.setdefault((k.dataset, k.model), {})[k.quant] = store.run(k)
    if not groups:
        have = ", ".join(str(k) for k in store.runs()) or "none"
        raise RunNotFound(f"no run matches the filters in {store.root} (runs here: {have})")
    methods, layers = [], []
    with scheduler(cfg.scheduler, memory_limit=cfg.memory_limit):
        for (dataset, model), runs in sorted(groups.items()):
            base_q = cfg.baseline or baseline_of(list(runs))
            if base_q not in runs or len(runs) < 2:
                log(f"{dataset}/{model}: no {base_q or 'fp16/fp32'} baseline with another run to compare")
                continue
            others = [runs[q] for q in sorted(runs, key=_order) if q != base_q]
            rows, per_layer = _group(runs[base_q], others, cfg, log)
            rows = rank(rows)
            part = part_name(dataset, model, None, f"vs-{base_q}")
            write_table(store.results, "method_comparison", part, _table(rows, METHOD_COLUMNS))
            write_table(store.results, "method_comparison_layers", part, _table(per_layer, LAYER_COLUMNS))
            methods += rows
            layers += per_layer
    if not methods:
        raise RunNotFound(
            f"nothing to compare in {store.root}: each dataset/model needs a "
            f"{cfg.baseline or 'fp16 or fp32'} baseline run and another run (see qcache ls)"
        )
    return _table(methods, METHOD_COLUMNS), _table(layers, LAYER_COLUMNS)


def _group(base: Run, others: list[Run], cfg: CompareConfig, log: Log) -> tuple[list[dict], list[dict]]:
    """Method rows and layer rows of one dataset/model."""
    base_preds = base.predictions()
    base_metrics = calibration.calibration_metrics(base_preds, reading=cfg.reading, n_ranges=cfg.n_ranges)
    base_terms: dict[int, SelfTerms] = {}  # the baseline's own Gram, once per layer for every method
    base_recorded = gram_terms.load(base)  # the gram_terms table: read once per run, written once per run
    base_new: list[gram_terms.Term] = []
    base_sets = neuron_sets(base)
    rows, per_layer = [], []
    for run in others:
        key = base.key.dataset, base.key.model, base.key.quant, run.key.quant
        reason = mismatch(base, run)
        if reason is None and cfg.tap not in run.manifest["taps"]:
            reason = f"tap {cfg.tap!r} is not cached in {run.key}"
        if reason is None and cfg.tap not in base.manifest["taps"]:
            reason = f"tap {cfg.tap!r} is not cached in {base.key}"
        if reason is not None:
            log(f"{run.key}: not compared with {base.key.quant}: {reason}")
            rows.append(dict(zip(METHOD_COLUMNS[:4], key, strict=True), skipped=reason))
            continue
        layers = _layers(base, run, cfg.layers)
        if cfg.layers is None:
            dense = dense_layers([base, run], layers, cfg.tap, "the comparison")
            if not dense:  # one line for the method, not one for its layers and one for it
                reason = no_dense_layer(layers, cfg.tap)
                log(f"{run.key}: not compared with {base.key.quant}: {reason}")
                rows.append(dict(zip(METHOD_COLUMNS[:4], key, strict=True), skipped=reason))
                continue
            layers = dense_layers([base, run], layers, cfg.tap, "the comparison", log)
        sets = neuron_sets(run)
        if sets["salient"] and sets["salient_options"] != base_sets["salient_options"]:
            log(f"{run.key}: salient sets chosen with other options than {base.key.quant}'s: no Jaccard")
            sets["salient"] = {}
        lrows = []
        recorded, new = gram_terms.load(run), []
        for layer in layers:
            x, y = base.activations(layer, cfg.tap), run.activations(layer, cfg.tap)
            opts = {"precision": cfg.precision, "memory_limit": cfg.memory_limit, "debiased": cfg.debiased}
            x_terms = base_terms.get(layer) or _recorded(base_recorded, layer, x, cfg)
            y_terms = _recorded(recorded, layer, y, cfg)
            res = linear_cka(x, y, x_terms=x_terms, y_terms=y_terms, **opts)
            base_terms[layer] = res.x
            # terms computed here are recorded for later comparisons (gram_terms.py)
            if x_terms is None:
                base_new.append(_term(layer, res.x, cfg))
            if y_terms is None:
                new.append(_term(layer, res.y, cfg))
            r = layer_drift(x, y).r
            fin = r[np.isfinite(r)]
            row = dict(zip(LAYER_COLUMNS[:4], key, strict=True))
            row.update(
                layer=layer,
                n_tokens=int(x.shape[0]),
                n_neurons=int(x.shape[1]),
                cka=res.cka,
                cka_debiased=res.cka_debiased,
                r_median=float(np.median(fin)) if fin.size else float("nan"),
                share_r_below_0_9=float((fin < 0.9).mean()) if fin.size else float("nan"),
                n_r_undefined=int(r.size - fin.size),
                r_values=r,
            )
            for what in ("dead", "salient"):
                a, b = base_sets[what].get(layer), sets[what].get(layer)
                row[f"n_{what}_base"] = None if a is None else len(a)
                row[f"n_{what}"] = None if b is None else len(b)
                row[f"{what}_jaccard"] = _jaccard(a, b)
            lrows.append(row)
            med = row["r_median"]
            log(f"{run.key} layer {layer}: CKA {res.cka:.6f} with {base.key.quant}, median r {med:.4f}")
        gram_terms.record(run, new)
        rows.append(_method_row(base, run, base_preds, base_metrics, lrows, cfg))
        per_layer += [{k: v for k, v in r.items() if k != "r_values"} for r in lrows]
    gram_terms.record(base, base_new)
    return rows, per_layer


def _recorded(
    recorded: dict[tuple[int, str, str], gram_terms.Term], layer: int, x: Any, cfg: CompareConfig
) -> SelfTerms | None:
    """The layer's self term from a run's ``gram_terms`` rows (left by redundancy or an earlier compare)."""
    t = gram_terms.find(recorded, layer, cfg.tap, cfg.precision, debiased=cfg.debiased)
    return None if t is None else recorded_terms(x, t.gram_sq, cfg.precision, t.sum_k, t.sum_kk)


def _term(layer: int, terms: SelfTerms, cfg: CompareConfig) -> gram_terms.Term:
    return gram_terms.Term(
        layer, cfg.tap, terms.n, cfg.precision, terms.gram_sq, terms.sum_k, terms.sum_kk, "compare"
    )


def _layers(base: Run, run: Run, chosen: tuple[int, ...] | None) -> list[int]:
    both = sorted(set(base.layers) & set(run.layers))
    if chosen is None:
        return both
    missing = [n for n in chosen if n not in both]
    if missing:
        raise InvalidOption(
            f"layer(s) {missing} are not cached in both {base.key} and {run.key} (both have: {both})"
        )
    return list(chosen)


def _method_row(
    base: Run,
    run: Run,
    base_preds: pa.Table,
    base_metrics: dict[str, float],
    lrows: list[dict],
    cfg: CompareConfig,
) -> dict[str, Any]:
    """One method's row: answers, calibration changes and the layer rows summed up."""
    preds = run.predictions()
    metrics = calibration.calibration_metrics(preds, reading=cfg.reading, n_ranges=cfg.n_ranges)
    col = FLIP_COLUMN[cfg.reading]
    a = dict(zip(base_preds["example_id"].to_pylist(), base_preds[col].to_pylist(), strict=True))
    b = dict(zip(preds["example_id"].to_pylist(), preds[col].to_pylist(), strict=True))
    shared = sorted(set(a) & set(b))
    cka = np.array([r["cka"] for r in lrows], dtype=float)
    whole = bool(cka.size) and bool(np.isfinite(cka).all())
    unbiased = np.array([np.nan if r["cka_debiased"] is None else r["cka_debiased"] for r in lrows])
    r_all = np.concatenate([r["r_values"] for r in lrows]) if lrows else np.zeros(0)
    r_fin = r_all[np.isfinite(r_all)]
    k = base.key
    return {
        "dataset": k.dataset,
        "model": k.model,
        "baseline": k.quant,
        "quant": run.key.quant,
        "skipped": None,
        "n_examples": len(shared),
        "n_tokens": int(base.layout.n_tokens),
        "n_layers": len(lrows),
        "accuracy_base": base_metrics.get("accuracy"),
        "accuracy": metrics.get("accuracy"),
        "accuracy_change": _diff(metrics, base_metrics, "accuracy"),
        "flip_share": float(np.mean([a[e] != b[e] for e in shared])) if shared else float("nan"),
        "ace_base": base_metrics.get("ace"),
        "ace": metrics.get("ace"),
        "ace_change": _diff(metrics, base_metrics, "ace"),
        "ece_change": _diff(metrics, base_metrics, "ece"),
        "brier_change": _diff(metrics, base_metrics, "brier"),
        "cka_mean": _mean(cka),
        "cka_min": float(np.min(cka)) if whole else float("nan"),
        "cka_min_layer": int(lrows[int(np.argmin(cka))]["layer"]) if whole else None,
        "cka_debiased_mean": _mean(unbiased) if cfg.debiased else None,
        "r_median": float(np.median(r_fin)) if r_fin.size else float("nan"),
        "share_r_below_0_9": float((r_fin < 0.9).mean()) if r_fin.size else float("nan"),
        "dead_jaccard": _mean(np.array([r["dead_jaccard"] for r in lrows], dtype=float), skip_nan=True),
        "salient_jaccard": _mean(np.array([r["salient_jaccard"] for r in lrows], dtype=float), skip_nan=True),
        "reading": cfg.reading,
        "tap": cfg.tap,
        "precision": cfg.precision,
        "base_run_id": base.creation_id,
        "run_id": run.creation_id,
    }


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` sorted by ``RANK_RULE`` with ``rank`` 1, 2, ... (skipped methods last, rank None)."""

    def key(r: dict[str, Any]) -> tuple:
        cka = r.get("cka_mean")
        missing = cka is None or not np.isfinite(cka)
        flips = r.get("flip_share")
        acc = r.get("accuracy_change")
        return (
            missing,
            0.0 if missing else -round(float(cka), 4),
            np.inf if flips is None or not np.isfinite(flips) else flips,
            np.inf if acc is None or not np.isfinite(acc) else abs(acc),
            r["quant"],
        )

    done = sorted((r for r in rows if not r.get("skipped")), key=key)
    for i, r in enumerate(done, start=1):
        r["rank"] = i
    skipped = [dict(r, rank=None) for r in rows if r.get("skipped")]
    return done + skipped


def _jaccard(a: set[int] | None, b: set[int] | None) -> float:
    if a is None or b is None:
        return float("nan")
    union = len(a | b)
    return len(a & b) / union if union else float("nan")


def _diff(m: dict[str, float], base: dict[str, float], name: str) -> float:
    return m[name] - base[name] if name in m and name in base else float("nan")


def _mean(v: np.ndarray, skip_nan: bool = False) -> float:
    if skip_nan:
        v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _order(q: str) -> tuple[int, str]:
    return (QUANTS.index(q) if q in QUANTS else len(QUANTS), q)


_TYPES = {
    "rank": pa.int32(),
    "layer": pa.int32(),
    "cka_min_layer": pa.int32(),
    "skipped": pa.string(),
    "base_run_id": pa.string(),
    "run_id": pa.string(),
    "reading": pa.string(),
    "tap": pa.string(),
    "precision": pa.string(),
}


def _table(rows: list[dict[str, Any]], columns: list[str]) -> pa.Table:
    """Rows as a table of ``columns`` (missing values null), numbers as float64 unless typed above."""
    out = {}
    for c in columns:
        vals = [r.get(c) for r in rows]
        if c in ("dataset", "model", "baseline", "quant"):
            out[c] = pa.array(vals, pa.string())
        elif c in _TYPES:
            out[c] = pa.array(vals, _TYPES[c])
        elif c.startswith("n_"):
            out[c] = pa.array(vals, pa.int64())
        else:
            out[c] = pa.array([None if v is None else float(v) for v in vals], pa.float64())
    return pa.table(out)
