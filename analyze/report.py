"""``qcache report``: one self-contained HTML file, plus every figure as PNG and every table as CSV.

Everything shown is read from the store's result tables (``<store>/tables``) and run manifests; what is
missing is named in the report with the command that produces it. Layout of ``out``::

    report.html            figures embedded as base64 PNG, opens offline
    figures/<name>.png     every figure
    tables/<name>.csv      every table shown, and every result table it was built from

>>> build_report(ReportConfig(store=Path("qcache-store"), out=Path("qcache-report")))  # doctest: +SKIP
PosixPath('qcache-report/report.html')
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from qcache.store import Store, open_store
from qcache.store.errors import InvalidOption, QCacheError
from qcache.store.keys import BITS_TO_QUANT, RunKey
from qcache.store.tables import part_name, part_state, run_parts

from . import figures
from . import report_comparisons as comparisons
from .page import Page, cell, lacking, load_table, pivot, render, rows_of, run_order, values
from .report_calibration import calibration_section
from .report_methods import analyze_comparison, methods

Log = Callable[[str], None]


@dataclass(frozen=True)
class ReportConfig:
    """Where to read and write, and which answer reading the calibration figures use."""

    store: Store | str | Path  # a Store, or a directory or URL to open
    out: Path = Path("qcache-report")
    reading: str = "paper"
    analyze: bool = False  # run the analyses whose tables are missing first


def build_report(cfg: ReportConfig, log: Log = print) -> Path:
    """Write the report for every run in ``cfg.store``; returns the path of ``report.html``."""
    if cfg.reading not in ("paper", "authors"):
        raise InvalidOption(f"--reading {cfg.reading!r}: use paper or authors")
    store = open_store(cfg.store)
    if cfg.analyze:
        analyze_missing(store, log=log)
    page = Page(cfg.out, store)
    provenance(page)
    calibration_section(page, cfg.reading)
    salience(page)
    dead(page)
    redundancy(page)
    comparisons.overlap(page)
    comparisons.drift(page)
    methods(page)
    path = cfg.out / "report.html"
    path.write_text(render(page, reading=cfg.reading))
    return path


# --- sections ---------------------------------------------------------------------------------------------


def provenance(page: Page) -> None:
    parts = page.section("provenance", "Runs and provenance")
    rows = []
    for k in page.store.runs():
        run = page.store.run(k)
        m, ds = run.manifest, run.manifest.get("dataset") or {}
        rows.append(
            {
                "run": str(k),
                "model": m.get("model"),
                "model_source": m.get("model_source"),
                "model_revision": str(m.get("model_revision") or "not recorded"),
                "quant": m.get("quant"),
                "quant_config": json.dumps(m.get("quant_config"), sort_keys=True),
                "dtype": m.get("dtype"),
                "dataset": ds.get("name"),
                "dataset_source": str(ds.get("source") or ""),
                "limit": str(ds.get("limit")),
                "seed": str(ds.get("seed")),
                "n_examples": m.get("n_examples"),
                "n_tokens": m.get("n_tokens"),
                "label_scoring": str(m.get("label_scoring", "first-token")),
                "layers": ",".join(map(str, m.get("layers", []))),
                "taps": ",".join(m.get("taps", [])),
                "attributions": "yes" if m.get("attributions") else "no",
                "extracted": f"{100 * run.fraction_done:.0f}%",
                "device": str(m.get("device") or "not recorded"),
                "versions": " ".join(f"{a}={b}" for a, b in (m.get("versions") or {}).items())
                or "not recorded",
                "created_at": str(m.get("created_at") or ""),
                "weights_note": str(m.get("weights_note") or ""),
            }
        )
    if not rows:
        parts.append(page.gap("no runs in this store: run qcache extract --model M --bits B first"))
        return
    table = pa.Table.from_pylist(rows)
    parts.append(page.table("provenance", table, "One row per run, from its manifest.", show=False))
    cards = "".join(
        f'<div class="run"><h3>{html.escape(r["run"])}</h3><dl>'
        + "".join(
            f"<dt>{html.escape(k)}</dt><dd>{html.escape(cell(v))}</dd>" for k, v in r.items() if k != "run"
        )
        + "</dl></div>"
        for r in rows
    )
    parts.append(f'<div class="runs">{cards}</div>')
    for r in rows:
        if r["extracted"] != "100%":
            parts.append(page.gap(f"{r['run']} is {r['extracted']} extracted: finish its qcache extract"))
    for k in page.store.runs():
        stale = stale_tables(page.store, k)
        if stale:
            parts.append(
                page.gap(
                    f"{', '.join(stale)} of {k} were computed from an earlier extraction of the run (or by a "
                    "qcache before 0.1.0) and may be out of date: run qcache report --analyze"
                )
            )
        partial = stale_tables(page.store, k, "partial")
        if partial:
            parts.append(
                page.gap(
                    f"{', '.join(partial)} of {k} were computed on part of its tokens (--allow-partial) and "
                    "the run has more now: they are out of date; run qcache report --analyze"
                )
            )


# Tables with one part per run, each stamped with the creation id of the run it was computed from.
PER_RUN_TABLES = (
    "predictions",
    "metrics",
    "reliability",
    "neuron_stats",
    "dead_neurons",
    "redundancy",
    "redundancy_summary",
    "redundancy_top_pairs",
    "salient_neurons",
    "salience_counts",
)


def stale_tables(store: Store, key: RunKey, state: str = "stale") -> list[str]:
    """The per-run tables with a part for ``key`` in ``state`` (``store.tables.part_state``): ``stale``,
    from an earlier creation of the run; ``partial``, computed on fewer tokens than the run has now."""
    run = store.run(key)
    return [
        n
        for n in PER_RUN_TABLES
        if any(
            part_state(p, run.creation_id, run.tokens_done) == state
            for p in run_parts(store.results, n, key.dataset, key.model, key.quant)
        )
    ]


def salience(page: Page) -> None:
    parts = page.section("salient", "Salient neurons per layer (Table 3)")
    attributed = [k for k in page.store.runs() if page.store.run(k).manifest.get("attributions")]
    counts = load_table(page.store.results, "salience_counts")
    if not attributed and counts is None:
        parts.append(
            page.gap(
                "no attributions in this store: run qcache extract --attributions (or qcache "
                "attribute RUN), then qcache analyze salience"
            )
        )
        return
    if counts is None:
        parts.append(page.gap("attributions are stored but no salience tables: run qcache analyze salience"))
        return
    rows = [r for r in rows_of(counts) if r["strategy"] == "union"]
    parts.append(page.notes({r["model"] for r in rows}))
    thresholds = values(rows, "threshold")
    # tables written before these options existed lack the columns: they used the defaults
    options = "/".join(
        sorted(
            {
                f"--repeated-tokens {r.get('repeated_tokens') or 'all'} --max-of {r.get('max_of') or 'abs'}"
                for r in rows
            }
        )
    )
    parts.append(
        page.table(
            "table3_salient",
            pivot(rows, "layer", "n_salient", total=True),
            "Distinct salient neurons over each run's examples (union of strategies, "
            f"normalized attribution > {thresholds}; {options}).",
        )
    )
    parts.append(_layer_figure(page, rows, "n_salient", "table3_salient", "salient neurons"))
    parts.append(
        lacking(page, counts, "salience", "qcache extract --attributions, then qcache analyze salience")
    )
    parts.append(page.table("salience_counts", counts, "Every strategy.", show=False))


def dead(page: Page) -> None:
    parts = page.section("dead", "Dead neurons per layer (Table 4)")
    table = load_table(page.store.results, "dead_neurons")
    if table is None:
        parts.append(page.gap("no dead-neuron tables: run qcache analyze dead (or qcache report --analyze)"))
        return
    rows = _dense(rows_of(table))
    parts.append(page.notes({r["model"] for r in rows}))
    bounds = values(rows, "bound")
    parts.append(
        page.table(
            "table4_dead_pct",
            pivot(rows, "layer", "pct_dead"),
            f"Percentage of neurons whose every activation lies within +-{bounds}.",
        )
    )
    parts.append(_layer_figure(page, rows, "pct_dead", "table4_dead_pct", "dead neurons (%)"))
    parts.append(lacking(page, table, "dead-neuron counts", "qcache analyze dead"))
    parts.append(page.table("dead_neurons", table, "The dead_neurons table.", show=False))


def _layer_figure(page: Page, rows: list[dict[str, Any]], value: str, name: str, label: str) -> str:
    panels: dict[str, dict[str, dict[int, float]]] = {}
    for r in sorted(rows, key=run_order):
        panel = panels.setdefault(f"{r['dataset']} / {r['model']}", {})
        panel.setdefault(r["quant"], {})[r["layer"]] = r[value]
    return page.figure(name, figures.layer_bars(panels, ylabel=label), f"{label.capitalize()} per layer.")


def redundancy(page: Page) -> None:
    parts = page.section("redundancy", "Neuron redundancy: |r| histograms (Figures 4-5)")
    hist = load_table(page.store.results, "redundancy")
    summ = load_table(page.store.results, "redundancy_summary")
    if hist is None or summ is None:
        parts.append(
            page.gap("no redundancy tables: run qcache analyze redundancy (or qcache report --analyze)")
        )
        return
    # token-level rows (the paper's) when a run has both units; per-example ones only where they are all
    rows = _one_unit([r for r in _dense(rows_of(hist)) if r["layer"] == r["layer_b"]])
    parts.append(page.notes({r["model"] for r in rows}))
    edges = sorted({r["bin_lo"] for r in rows} | {r["bin_hi"] for r in rows})
    panels: dict[str, dict[str, list[int]]] = {}
    for r in sorted(rows, key=run_order):
        panel = panels.setdefault(f"{r['dataset']} / {r['model']}", {})
        counts = panel.setdefault(r["quant"], [0] * (len(edges) - 1))
        counts[edges.index(r["bin_lo"])] += r["pairs"]
    units = sorted({r["unit"] for r in rows})
    parts.append(
        page.figure(
            "fig4_5_redundancy",
            figures.bin_bars(panels, edges, xlabel="|Pearson r| bin", ylabel="neuron pairs (symlog)"),
            f"Neuron pairs per |r| bin, summed over the cached layers (within-layer pairs, "
            f"correlated over {'/'.join(units)}s).",
        )
    )
    srows = _one_unit([r for r in _dense(rows_of(summ)) if r["layer"] == r["layer_b"]])
    threshold = values(srows, "threshold")
    parts.append(
        page.table(
            "redundancy_pairs_above",
            pivot(srows, "layer", "pairs_above", total=True),
            f"Neuron pairs with |r| >= {threshold} per layer (the paper's count of redundant pairs).",
        )
    )
    parts.append(lacking(page, summ, "redundancy", "qcache analyze redundancy"))
    parts.append(page.table("redundancy", hist, "The redundancy histogram table.", show=False))
    parts.append(page.table("redundancy_summary", summ, "The redundancy summary table.", show=False))


def _dense(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the paper's tap (``act``; tables written before taps were recorded lack the column) on
    dense layers and shared experts: per-expert rows of mixture-of-experts layers (``expert`` set) and other
    taps' rows are in the tables, not the figures."""
    return [r for r in rows if r.get("expert") is None and r.get("tap") in (None, "act")]


def _one_unit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's rows of one unit: ``token`` where the run has it, else ``example`` (never both summed)."""

    def key(r: dict[str, Any]) -> tuple[str, str, str]:
        return r["dataset"], r["model"], r["quant"]

    with_token = {key(r) for r in rows if r["unit"] == "token"}
    return [r for r in rows if r["unit"] == "token" or key(r) not in with_token]


def analyze_missing(store: Store, log: Log = print) -> None:
    """Run the analyses whose tables lack a run (calibration, dead, redundancy, salience, drift, overlaps)."""
    from . import drift as drift_mod
    from . import salience as salience_mod
    from .runner import AnalyzeConfig, run_calibration, run_dead, run_redundancy

    to_bits = {q: b for b, q in BITS_TO_QUANT.items()}
    tables = store.tables_dir
    attributed = []
    for k in store.runs():
        run = store.run(k)
        if not run.complete or k.quant not in to_bits:
            log(f"{k}: not analyzed ({'unfinished extraction' if not run.complete else 'unknown quant'})")
            continue
        part = part_name(k.dataset, k.model, k.quant)
        cfg = AnalyzeConfig(store=store, dataset=k.dataset, model=k.model, bits=to_bits[k.quant])
        for name, fn in (
            ("metrics", run_calibration),
            ("neuron_stats", run_dead),
            ("redundancy_summary", run_redundancy),
        ):
            state = part_state(tables / name / part, run.creation_id, run.tokens_done)
            if state == "current":
                continue
            if state == "stale":
                log(f"{k}: {name} comes from an earlier extraction of the run: recomputing")
            if state == "partial":
                log(f"{k}: {name} was computed on part of the run's tokens (--allow-partial): recomputing")
            try:
                fn(cfg, log=log)
            except QCacheError as exc:  # e.g. a run cached without activations: the report names the gap
                log(f"{k}: {name} not computed: {exc}")
        if run.manifest.get("attributions"):
            counts = part_state(tables / "salience_counts" / part, run.creation_id, run.tokens_done)
            attributed.append((run, counts == "current"))
    if attributed and not all(have for _, have in attributed):
        results = [salience_mod.salience(run) for run, _ in attributed]
        salience_mod.write_tables(store.results, results, salience_mod.overlap(results))
        log(f"salience of {len(results)} attributed run(s) written")
    drift_mod.run_drift(store, log=log)
    drift_mod.dead_overlap(store, log=log)
    analyze_comparison(store, log=log)
