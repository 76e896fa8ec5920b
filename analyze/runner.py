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

from . import calibration, dead, drift, gram_terms, redundancy
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


def _activations(run: Run, layer: int, cfg: AnalyzeConfig, log: Log) -> da.Array:
    x = run.activations(layer, cfg.tap)
    if run.complete:
        return x
    mask = run.rows_done()
    log(f"{run.key}: using the {100 * mask.mean():.1f}% of tokens extracted so far (--allow-partial)")
    return x[mask]


def _keyed(run: Run, columns: dict[str, object]) -> pa.Table:
    k = run.key
    n = len(next(iter(columns.values())))  # type: ignore[arg-type]
    return pa.table({"dataset": [k.dataset] * n, "model": [k.model] * n, "quant": [k.quant] * n, **columns})


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
    """Per-neuron statistics and per-layer dead counts (the paper's Table 4) for every selected run."""
    rule = dead.DeadRule(cfg.dead_threshold, cfg.relu_eps)
    summaries = []
    with scheduler(cfg.scheduler, memory_limit=cfg.memory_limit):
        for run in select_runs(cfg):
            activation = run.manifest["activation"]
            stats_parts, rows = [], []
            for layer in _layers(run, cfg):
                st = dead.neuron_stats(_activations(run, layer, cfg, log), activation, rule)
                d = len(st.dead)
                stats_parts.append(
                    _keyed(
                        run,
                        {
                            "layer": np.full(d, layer, np.int32),
                            "neuron": np.arange(d, dtype=np.int32),
                            "min": st.minimum,
                            "max": st.maximum,
                            "mean": st.mean,
                            "std": st.std,
                            "frac_near_zero": st.frac_near_zero,
                            "dead": st.dead,
                            "n_nonfinite": st.n_nonfinite,
                        },
                    )
                )
                rows.append(
                    (
                        layer,
                        activation,
                        st.bound,
                        st.n_tokens,
                        d,
                        int(st.dead.sum()),
                        100.0 * st.dead.sum() / d,
                    )
                )
                log(f"{run.key} layer {layer}: {int(st.dead.sum())} of {d} neurons dead")
            stats = pa.concat_tables(stats_parts)
            _write(run, "neuron_stats", stats)
            names = ("layer", "activation", "bound", "n_tokens", "n_neurons", "n_dead", "pct_dead")
            table = _keyed(run, dict(zip(names, map(list, zip(*rows, strict=True)), strict=True)))
            _write(run, "dead_neurons", table)
            summaries.append(table)
    return pa.concat_tables(summaries)


def run_redundancy(cfg: AnalyzeConfig, log: Log = print) -> pa.Table:
    """|r| histograms and pairs above the threshold per layer (and across layers) for every run."""
    summaries = []
    with scheduler(cfg.scheduler, memory_limit=cfg.memory_limit):
        for run in select_runs(cfg):
            layers = _layers(run, cfg)
            data = {n: _redundancy_input(run, n, cfg, log) for n in layers}
            # widths per array: the MLP width for act/down-in, the hidden size for resid
            block = redundancy.block_for_memory(max(int(x.shape[1]) for x in data.values()), cfg.memory_limit)
            pairs = [(a, a) for a in layers]
            if cfg.cross_layer:
                pairs += [(a, b) for i, a in enumerate(layers) for b in layers[i + 1 :]]
            hist, summ, tops, terms = [], [], [], []
            # token-level rows live in the run's main part, per-example rows beside it: both units coexist
            variant = REDUNDANCY_VARIANT if cfg.per_example else None
            for a, b in pairs:
                c = redundancy.correlation_counts(
                    data[a],
                    None if a == b else data[b],
                    threshold=cfg.corr_threshold,
                    block=block,
                    top_k=cfg.top_pairs,
                    memory_limit=cfg.memory_limit,
                )
                unit = "example" if cfg.per_example else "token"
                if c.gram_sq is not None and not cfg.per_example and run.complete:
                    # the layer's own Gram, which qcache compare's CKA needs too (analyze/gram_terms.py)
                    n = int(data[a].shape[0])
                    terms.append(gram_terms.Term(a, cfg.tap, n, "float32", c.gram_sq, source="redundancy"))
                hist += [
                    (a, b, unit, float(lo), float(hi), int(n))
                    for lo, hi, n in zip(redundancy.EDGES[:-1], redundancy.EDGES[1:], c.bins, strict=True)
                ]
                summ.append(
                    (
                        a,
                        b,
                        unit,
                        int(data[a].shape[1]),
                        c.n_constant,
                        c.n_pairs,
                        cfg.corr_threshold,
                        c.above,
                        100.0 * c.above / max(c.n_pairs, 1),
                    )
                )
                tops += [(a, b, unit, rank, i, j, r) for rank, (r, i, j) in enumerate(c.top, start=1)]
                above = f"{c.above} of {c.n_pairs} pairs with |r| >= {cfg.corr_threshold}"
                log(f"{run.key} layers {a}x{b}: {above}")
            _write_rows(
                run, "redundancy", ("layer", "layer_b", "unit", "bin_lo", "bin_hi", "pairs"), hist, variant
            )
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
            )
            summaries.append(_write_rows(run, "redundancy_summary", names, summ, variant))
            gram_terms.record(run, terms)
            if cfg.top_pairs:
                _write_rows(
                    run,
                    "redundancy_top_pairs",
                    ("layer", "layer_b", "unit", "rank", "neuron_a", "neuron_b", "abs_r"),
                    tops,
                    variant,
                )
    return pa.concat_tables(summaries)


def _redundancy_input(run: Run, layer: int, cfg: AnalyzeConfig, log: Log) -> da.Array:
    x = _activations(run, layer, cfg, log)
    if not cfg.per_example:
        return x
    example_id = run.token_index()["example_id"].to_numpy()
    if not run.complete:
        example_id = example_id[run.rows_done()]
    return redundancy.per_example_means(x, example_id, run.layout.n_examples)


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
