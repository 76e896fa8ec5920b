"""Apply analyses to the selected runs of a store and write their tables (redundancy: run_redundancy.py;
what they share: selection.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from qcache.store import open_store
from qcache.store.errors import RunMismatch, RunNotFound

from . import calibration, dead, drift, experts
from .run_redundancy import run_redundancy
from .scheduler import scheduler
from .selection import (
    REDUNDANCY_VARIANT,
    AnalyzeConfig,
    Log,
    chosen_layers,
    keyed,
    select_runs,
    selected_quant,
    write_part,
)

__all__ = [
    "REDUNDANCY_VARIANT",
    "AnalyzeConfig",
    "chosen_layers",
    "run_calibration",
    "run_dead",
    "run_drift",
    "run_redundancy",
    "select_runs",
]


def run_calibration(cfg: AnalyzeConfig, log: Log = print) -> pa.Table:
    """Predictions, metrics and reliability tables for every selected run; returns the metrics rows."""
    out = []
    for run in select_runs(cfg):
        preds = run.predictions()
        labels = np.array(run.label_words, dtype=object)
        cols = {name: preds[name] for name in preds.column_names}
        cols["gold_label"] = pa.array(labels[preds["gold"].to_numpy()].tolist(), pa.string())
        if "label_scoring" not in cols:  # runs extracted before --label-scoring read the first token
            scoring = str(run.manifest.get("label_scoring", "first-token"))
            cols["label_scoring"] = pa.array([scoring] * preds.num_rows, pa.string())
        write_part(run, "predictions", keyed(run, cols))
        metric_rows, rel_rows = [], []
        for reading in calibration.READINGS:
            values = calibration.calibration_metrics(preds, reading=reading, n_ranges=cfg.n_ranges)
            metric_rows += [(reading, m, v) for m, v in values.items()]
            conf, correct, _, _ = calibration.reading_arrays(preds, reading)
            rel_rows += [
                (reading, b.lo, b.hi, b.count, b.confidence, b.accuracy)
                for b in calibration.reliability(conf, correct)
            ]
        metrics = keyed(
            run,
            dict(zip(("reading", "metric", "value"), map(list, zip(*metric_rows, strict=True)), strict=True)),
        )
        write_part(run, "metrics", metrics)
        rel_cols = ("reading", "bin_lo", "bin_hi", "count", "confidence", "accuracy")
        write_part(
            run,
            "reliability",
            keyed(run, dict(zip(rel_cols, map(list, zip(*rel_rows, strict=True)), strict=True))),
        )
        out.append(metrics.filter(pa.compute.equal(metrics["reading"], cfg.reading)))
        log(f"{run.key}: calibration of {preds.num_rows} examples written")
    return pa.concat_tables(out)


def run_dead(cfg: AnalyzeConfig, log: Log = print) -> pa.Table:
    """Per-neuron statistics and per-layer dead counts (the paper's Table 4) for every selected run; an MoE
    layer gets one row per expert over the committed tokens routed to it (``expert``, ``n_tokens``), and an
    expert that saw no token a row of NaN figures (analyze/experts.py)."""
    rule = dead.DeadRule(cfg.dead_threshold, cfg.relu_eps)
    summaries = []
    with scheduler(cfg.scheduler, memory_limit=cfg.memory_limit):
        for run in select_runs(cfg):
            activation = run.manifest["activation"]
            bound = rule.bound(activation)
            experts.partial_note(run, log)
            stats_parts, rows = [], []
            for layer in chosen_layers(run, cfg):
                counts = []
                for part in experts.layer_parts(run, layer, cfg.tap, log):
                    st = _dead_stats(part, activation, rule)
                    stats_parts.append(keyed(run, _stats_columns(part, st)))
                    d = int(part.x.shape[1])
                    n_dead = None if st is None else int(st.dead.sum())
                    pct = float("nan") if n_dead is None else 100.0 * n_dead / d
                    rows.append((layer, activation, bound, part.n_tokens, d, n_dead, pct, part.expert))
                    if part.expert is None:
                        shared = " (shared expert)" if layer in run.moe_layers and cfg.tap != "resid" else ""
                        log(f"{run.key} layer {layer}{shared}: {n_dead} of {d} neurons dead")
                    else:
                        counts.append(part.n_tokens)
                if counts:
                    dead_e = sum(r[5] or 0 for r in rows[-len(counts) :])
                    what = f"{dead_e} of {len(counts) * rows[-1][4]} expert neurons dead"
                    log(experts.expert_line(run, layer, counts, what, experts.MIN_TOKENS["dead"]))
            stats = pa.concat_tables(stats_parts)
            # rows of layers not analysed now are kept when computed the same way (selection.write_part)
            same = {
                "layers": chosen_layers(run, cfg),
                "options": {"tap": cfg.tap, "dead_threshold": cfg.dead_threshold, "relu_eps": cfg.relu_eps},
            }
            write_part(run, "neuron_stats", stats, **same)
            names = ("layer", "activation", "bound", "n_tokens", "n_neurons", "n_dead", "pct_dead", "expert")
            table = keyed(run, dict(zip(names, map(list, zip(*rows, strict=True)), strict=True)))
            write_part(run, "dead_neurons", table, **same)
            summaries.append(table)
    return pa.concat_tables(summaries)


def _dead_stats(part: experts.Part, activation: str, rule: dead.DeadRule) -> dead.NeuronStats | None:
    """The part's statistics, or None when it holds too few tokens (an expert nobody was routed to)."""
    if part.expert is not None and part.n_tokens < experts.MIN_TOKENS["dead"]:
        return None
    return dead.neuron_stats(part.x, activation, rule)


def _stats_columns(part: experts.Part, st: dead.NeuronStats | None) -> dict[str, object]:
    """``neuron_stats`` columns of one part; NaN figures and a null ``dead`` where ``st`` is None."""
    d = int(part.x.shape[1])
    nan = np.full(d, np.nan)
    none = np.ones(d, dtype=bool)
    return {
        "layer": np.full(d, part.layer, np.int32),
        "neuron": np.arange(d, dtype=np.int32),
        "min": nan if st is None else st.minimum,
        "max": nan if st is None else st.maximum,
        "mean": nan if st is None else st.mean,
        "std": nan if st is None else st.std,
        "frac_near_zero": nan if st is None else st.frac_near_zero,
        "dead": pa.array(np.zeros(d, bool), mask=none) if st is None else st.dead,
        "n_nonfinite": pa.array(np.zeros(d, np.int64), mask=none) if st is None else st.n_nonfinite,
        "expert": pa.array(np.full(d, part.expert or 0, np.int32), mask=np.full(d, part.expert is None)),
    }


def run_drift(
    cfg: AnalyzeConfig, *, baseline: str | None = None, strict: bool = True, log: Log = print
) -> pa.Table:
    """Per-neuron drift of each selected run from its dataset and model's baseline run (``baseline``, default
    fp16, else fp32): writes ``activation_drift`` and ``drift_skipped`` (analyze/drift.py); returns the
    per-layer summary (``drift.summarize``). ``cfg.bits`` picks the compared run, not the baseline.

    With ``strict``, raises ``RunNotFound`` when the filters leave no baseline-and-other pair, and
    ``RunMismatch`` when every pair was skipped (e.g. the runs saw different tokens).
    """
    s = open_store(cfg.store)
    quant = selected_quant(cfg)
    with scheduler(cfg.scheduler, memory_limit=cfg.memory_limit):
        table, skipped = drift.run_drift(
            s,
            tap=cfg.tap,
            dataset=cfg.dataset,
            model=cfg.model,
            quant=quant,
            baseline=baseline,
            layers=list(cfg.layers) if cfg.layers is not None else None,
            allow_partial=cfg.allow_partial,
            log=log,
        )
    if strict and not table.num_rows:
        if skipped.num_rows:
            reasons = "; ".join(
                f"{r['dataset']}/{r['model']}/{r['quant']}: {r['reason']}" for r in skipped.to_pylist()
            )
            raise RunMismatch(f"no drift computed, every pair was skipped ({reasons})")
        have = ", ".join(str(k) for k in s.runs()) or "none"
        filters = (("dataset", cfg.dataset), ("model", cfg.model), ("quant", quant))
        asked = ", ".join(f"{n} {v}" for n, v in filters if v)
        raise RunNotFound(
            f"no pair to compare: drift needs a baseline run ({baseline or 'fp16, else fp32'}) and another "
            f"run of the same dataset and model{' with ' + asked if asked else ''} (runs here: {have})"
        )
    return drift.summarize(table)
