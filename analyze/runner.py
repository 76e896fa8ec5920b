"""Apply analyses to the selected runs of a store and write their tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import pyarrow as pa

from qcache.store import Run, Store, open_store
from qcache.store.errors import InvalidOption, RunMismatch, RunNotFound
from qcache.store.keys import BITS_TO_QUANT
from qcache.store.tables import part_name, write_table

from . import calibration, dead, drift, experts, gram_terms, redundancy
from .scheduler import scheduler

Log = Callable[[str], None]
# Part-name variant of the redundancy tables over per-example means (``unit`` = "example")
REDUNDANCY_VARIANT = "per-example"


@dataclass(frozen=True)
class AnalyzeConfig:
    """Options shared by every ``qcache analyze`` command."""

    store: Store | str | Path  # a Store, or a directory or URL to open
    dataset: str | None = None
    model: str | None = None
    bits: int | None = None
    layers: tuple[int, ...] | None = None
    tap: str = "act"
    scheduler: str | None = None
    memory_limit: int | None = None
    allow_partial: bool = False
    # calibration
    reading: str = "paper"
    n_ranges: int = 10
    # dead neurons
    dead_threshold: float = 0.1
    relu_eps: float = 0.0
    # redundancy
    corr_threshold: float = 0.8
    per_example: bool = False
    cross_layer: bool = False
    top_pairs: int = 0


def select_runs(cfg: AnalyzeConfig) -> list[Run]:
    s = open_store(cfg.store)
    keys = s.select(dataset=cfg.dataset, model=cfg.model, quant=_quant(cfg))
    if not keys:
        have = ", ".join(str(k) for k in s.runs()) or "none"
        raise RunNotFound(f"no run matches the filters in {s.root} (runs here: {have})")
    runs = [s.run(k) for k in keys]
    for run in runs:
        run.require_complete(cfg.allow_partial)
    return runs


def _quant(cfg: AnalyzeConfig) -> str | None:
    """The quantization ``--bits`` selects (None: all)."""
    if cfg.bits is not None and cfg.bits not in BITS_TO_QUANT:
        raise InvalidOption(f"--bits {cfg.bits} is not supported: use 32, 16, 8 or 4")
    return BITS_TO_QUANT[cfg.bits] if cfg.bits is not None else None


def _layers(run: Run, cfg: AnalyzeConfig) -> list[int]:
    if cfg.layers is None:
        return run.layers
    missing = [n for n in cfg.layers if n not in run.layers]
    if missing:
        raise InvalidOption(f"layer(s) {missing} are not cached in {run.key} (cached: {run.layers})")
    return list(cfg.layers)


# Types of columns that may hold nulls (a dense row's expert, an expert's counts with too few tokens): set
# so that a part whose rows are all null keeps the column's type.
NULLABLE = {
    "expert": pa.int32(),
    "n_tokens": pa.int64(),
    "n_dead": pa.int64(),
    "pct_dead": pa.float64(),
    "n_constant": pa.int64(),
    "n_pairs": pa.int64(),
    "pairs_above": pa.int64(),
    "pct_above": pa.float64(),
}


def _keyed(run: Run, columns: dict[str, object]) -> pa.Table:
    k = run.key
    n = len(next(iter(columns.values())))  # type: ignore[arg-type]
    typed = {
        name: pa.array(v, NULLABLE[name]) if name in NULLABLE and isinstance(v, list) else v
        for name, v in columns.items()
    }
    return pa.table({"dataset": [k.dataset] * n, "model": [k.model] * n, "quant": [k.quant] * n, **typed})


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
        _write(run, "predictions", _keyed(run, cols))
        metric_rows, rel_rows = [], []
        for reading in calibration.READINGS:
            values = calibration.calibration_metrics(preds, reading=reading, n_ranges=cfg.n_ranges)
            metric_rows += [(reading, m, v) for m, v in values.items()]
            conf, correct, _, _ = calibration.reading_arrays(preds, reading)
            rel_rows += [
                (reading, b.lo, b.hi, b.count, b.confidence, b.accuracy)
                for b in calibration.reliability(conf, correct)
            ]
        metrics = _keyed(
            run,
            dict(zip(("reading", "metric", "value"), map(list, zip(*metric_rows, strict=True)), strict=True)),
        )
        _write(run, "metrics", metrics)
        rel_cols = ("reading", "bin_lo", "bin_hi", "count", "confidence", "accuracy")
        _write(
            run,
            "reliability",
            _keyed(run, dict(zip(rel_cols, map(list, zip(*rel_rows, strict=True)), strict=True))),
        )
        out.append(metrics.filter(pa.compute.equal(metrics["reading"], cfg.reading)))
        log(f"{run.key}: calibration of {preds.num_rows} examples written")
    return pa.concat_tables(out)


def _key(run: Run) -> tuple[str, str, str]:
    return run.key.dataset, run.key.model, run.key.quant


def _write(run: Run, name: str, table: pa.Table, variant: str | None = None) -> None:
    """One run's part of a result table, stamped with the creation of the run it was computed from;
    ``variant`` writes a part beside the run's main one (see ``part_name``)."""
    write_table(run.store.results, name, part_name(*_key(run), variant), table, run.creation_id)


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
            for layer in _layers(run, cfg):
                counts = []
                for part in experts.layer_parts(run, layer, cfg.tap, log):
                    st = _dead_stats(part, activation, rule)
                    stats_parts.append(_keyed(run, _stats_columns(part, st)))
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
            _write(run, "neuron_stats", stats)
            names = ("layer", "activation", "bound", "n_tokens", "n_neurons", "n_dead", "pct_dead", "expert")
            table = _keyed(run, dict(zip(names, map(list, zip(*rows, strict=True)), strict=True)))
            _write(run, "dead_neurons", table)
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


def run_redundancy(cfg: AnalyzeConfig, log: Log = print) -> pa.Table:
    """|r| histograms and pairs above the threshold per layer (and across layers) for every run; an MoE
    layer gets rows per expert over the committed tokens routed to it (``expert``, ``n_tokens``), and an
    expert with fewer than two tokens (or examples, ``--per-example``) a summary row of null counts."""
    summaries = []
    need = experts.MIN_TOKENS["redundancy"]
    with scheduler(cfg.scheduler, memory_limit=cfg.memory_limit):
        for run in select_runs(cfg):
            layers = _layers(run, cfg)
            experts.partial_note(run, log)
            example_id = run.token_index()["example_id"].to_numpy() if cfg.per_example else None
            parts = [p for n in layers for p in experts.layer_parts(run, n, cfg.tap, log)]
            data = {id(p): _redundancy_input(p, example_id) for p in parts}
            # widths per array: the MLP width for act/down-in, the hidden size for resid, an expert's width
            block = redundancy.block_for_memory(max(int(x.shape[1]) for x in data.values()), cfg.memory_limit)
            pairs = [(p, p) for p in parts]
            if cfg.cross_layer:
                dense = [p for p in parts if p.expert is None]
                pairs += [(a, b) for i, a in enumerate(dense) for b in dense[i + 1 :]]
                moe_only = [n for n in layers if not experts.has_dense(run, n, cfg.tap)]
                if moe_only:
                    log(f"{run.key}: no cross-layer pairs for the experts of layers {moe_only} (unsupported)")
            hist, summ, tops, terms = [], [], [], []
            # token-level rows live in the run's main part, per-example rows beside it: both units coexist
            variant = REDUNDANCY_VARIANT if cfg.per_example else None
            unit = "example" if cfg.per_example else "token"
            counts: dict[int, list[int]] = {}
            for pa_, pb in pairs:
                a, b, e = pa_.layer, pb.layer, pa_.expert
                x = data[id(pa_)]
                d = int(x.shape[1])
                if e is not None:
                    counts.setdefault(a, []).append(pa_.n_tokens)
                if e is not None and x.shape[0] < need:
                    summ.append(
                        (a, b, unit, d, None, None, cfg.corr_threshold, None, float("nan"), e, pa_.n_tokens)
                    )
                    continue
                c = redundancy.correlation_counts(
                    x,
                    None if pa_ is pb else data[id(pb)],
                    threshold=cfg.corr_threshold,
                    block=block,
                    top_k=cfg.top_pairs,
                    memory_limit=cfg.memory_limit,
                )
                if c.gram_sq is not None and e is None and not cfg.per_example and run.complete:
                    # a dense layer's own Gram, which qcache compare's CKA needs too (analyze/gram_terms.py)
                    terms.append(
                        gram_terms.Term(
                            a, cfg.tap, int(x.shape[0]), "float32", c.gram_sq, source="redundancy"
                        )
                    )
                hist += [
                    (a, b, unit, float(lo), float(hi), int(n), e)
                    for lo, hi, n in zip(redundancy.EDGES[:-1], redundancy.EDGES[1:], c.bins, strict=True)
                ]
                pct = 100.0 * c.above / max(c.n_pairs, 1)
                summ.append(
                    (
                        a,
                        b,
                        unit,
                        d,
                        c.n_constant,
                        c.n_pairs,
                        cfg.corr_threshold,
                        c.above,
                        pct,
                        e,
                        pa_.n_tokens,
                    )
                )
                tops += [(a, b, unit, rank, i, j, r, e) for rank, (r, i, j) in enumerate(c.top, start=1)]
                if e is None:
                    above = f"{c.above} of {c.n_pairs} pairs with |r| >= {cfg.corr_threshold}"
                    log(f"{run.key} layers {a}x{b}: {above}")
            for layer, seen in counts.items():
                mine = [r for r in summ if r[0] == layer and r[9] is not None]
                above = f"{sum(r[7] or 0 for r in mine)} of {sum(r[5] or 0 for r in mine)} expert pairs"
                log(experts.expert_line(run, layer, seen, f"{above} with |r| >= {cfg.corr_threshold}", need))
            hist_names = ("layer", "layer_b", "unit", "bin_lo", "bin_hi", "pairs", "expert")
            _write_rows(run, "redundancy", hist_names, hist, variant)
            names = (
                "layer",
                "layer_b",
                "unit",
                "n_neurons",
                "n_constant",
                "n_pairs",
                "threshold",
                "pairs_above",
                "pct_above",
                "expert",
                "n_tokens",
            )
            summaries.append(_write_rows(run, "redundancy_summary", names, summ, variant))
            gram_terms.record(run, terms)
            if cfg.top_pairs:
                _write_rows(
                    run,
                    "redundancy_top_pairs",
                    ("layer", "layer_b", "unit", "rank", "neuron_a", "neuron_b", "abs_r", "expert"),
                    tops,
                    variant,
                )
    return pa.concat_tables(summaries)


def _redundancy_input(part: experts.Part, example_id: np.ndarray | None) -> da.Array:
    """The part's token rows, or with ``example_id`` (the run's ``(tokens,)`` example of each row) the mean
    of each example's rows in the part (examples with no row in it, e.g. none routed to an expert, left
    out)."""
    if example_id is None:
        return part.x
    ids = example_id if part.rows is None else example_id[part.rows]
    present, compact = np.unique(ids, return_inverse=True)
    return redundancy.per_example_means(part.x, compact.astype(np.int64), len(present))


def _write_rows(
    run: Run, name: str, names: tuple[str, ...], rows: list[tuple], variant: str | None = None
) -> pa.Table:
    cols = (
        {n: list(v) for n, v in zip(names, zip(*rows, strict=True), strict=True)}
        if rows
        else {n: [] for n in names}
    )
    table = _keyed(run, cols) if rows else pa.table({"dataset": [], "model": [], "quant": [], **cols})
    _write(run, name, table, variant)
    return table


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
    quant = _quant(cfg)
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
