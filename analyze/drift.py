"""Per-neuron activation drift between a baseline run and each quantized run (beyond the paper).

For one dataset and model, the baseline is the fp16 run (else fp32). Every other run of that dataset and
model saw the same prompts, so row ``t`` of both stores is the same token; for each layer and neuron ``j``
with ``b = baseline[:, j]`` and ``q = quantized[:, j]`` over the tokens where both are finite:

* ``r``: Pearson correlation of ``b`` and ``q`` (NaN when either is constant);
* ``mad``: mean of ``|q - b|``;
* ``rel_rms``: ``sqrt(mean((q - b)^2)) / sqrt(mean(b^2))`` (NaN when ``b`` is all zero).

Two passes of blockwise dask reductions per layer (means, then centered sums), so memory stays at a few
chunks whatever the run's size. Pairs whose token index differs are skipped with the reason recorded.

Also here: overlap of the dead-neuron sets (``neuron_stats.dead``) between every two quantizations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pyarrow as pa

from qcache.store import Run, Store, open_store
from qcache.store.errors import InvalidOption, RunMismatch
from qcache.store.keys import QUANTS, RunKey
from qcache.store.location import StorePath, read_parquet
from qcache.store.tables import part_name, table_parts, write_table

from .experts import dense_layers, no_dense_layer

BASELINES = ("fp16", "fp32")
DRIFT_COLUMNS = (
    "dataset",
    "model",
    "baseline",
    "quant",
    "layer",
    "neuron",
    "r",
    "mad",
    "rel_rms",
    "n_tokens",
)
SKIP_COLUMNS = ("dataset", "model", "baseline", "quant", "reason")
SUMMARY_COLUMNS = (
    *DRIFT_COLUMNS[:5],
    "n_neurons",
    "n_constant",
    "r_median",
    "r_p05",
    "frac_r_below_0.9",
    "mad_median",
    "rel_rms_median",
)
Log = Callable[[str], None]


@dataclass(frozen=True)
class LayerDrift:
    """Drift of one layer, each ``(neurons,)``."""

    r: np.ndarray
    mad: np.ndarray
    rel_rms: np.ndarray


def layer_drift(base: da.Array, quant: da.Array) -> LayerDrift:
    """Per-neuron drift of ``quant`` from ``base``, both ``(tokens, neurons)`` on the same tokens.

    >>> b = da.from_array(np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 4.0]]))
    >>> d = layer_drift(b, b * 2); d.r.round(6).tolist(), d.mad.tolist()
    ([1.0, 1.0], [1.0, 2.3333333333333335])
    """
    x = base.astype(np.float64)
    y = quant.astype(np.float64).rechunk(x.chunks)
    ok = da.isfinite(x) & da.isfinite(y)  # (tokens, neurons)
    x, y = da.where(ok, x, 0.0), da.where(ok, y, 0.0)
    n, sx, sy = dask.compute(ok.sum(axis=0), x.sum(axis=0), y.sum(axis=0))
    n_safe = np.maximum(n, 1)
    mx, my = sx / n_safe, sy / n_safe  # (neurons,)
    # Centered second pass: exact enough for activations whose mean dwarfs their spread.
    xc, yc = da.where(ok, x - mx, 0.0), da.where(ok, y - my, 0.0)
    diff = y - x
    sxx, syy, sxy, sabs, sdd, sbb = dask.compute(
        (xc * xc).sum(axis=0),
        (yc * yc).sum(axis=0),
        (xc * yc).sum(axis=0),
        da.abs(diff).sum(axis=0),
        (diff * diff).sum(axis=0),
        (x * x).sum(axis=0),
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where((sxx > 0) & (syy > 0), sxy / np.sqrt(sxx * syy), np.nan)
        rel = np.where(sbb > 0, np.sqrt(sdd / np.where(sbb > 0, sbb, 1.0)), np.nan)
    empty = n == 0
    mad = np.where(empty, np.nan, sabs / n_safe)
    return LayerDrift(r=np.clip(r, -1.0, 1.0), mad=mad, rel_rms=np.where(empty, np.nan, rel))


def baseline_of(quants: list[str]) -> str | None:
    """The baseline among a model's quantizations: fp16, else fp32, else None."""
    return next((b for b in BASELINES if b in quants), None)


def mismatch(base: Run, other: Run, *, allow_partial: bool = False) -> str | None:
    """Why two runs cannot be compared token by token, or None when they can; ``allow_partial`` accepts
    unfinished runs that share at least one committed token row."""
    if allow_partial:
        if not (base.rows_done() & other.rows_done()).any():
            return f"no token is extracted in both {base.key} and {other.key}"
    elif not base.complete or not other.complete:
        late = base if not base.complete else other
        return f"{late.key} is only {100 * late.fraction_done:.1f}% extracted"
    a, b = base.token_index(), other.token_index()
    if a.num_rows != b.num_rows:
        return f"token counts differ ({a.num_rows} in {base.key.quant} vs {b.num_rows} in {other.key.quant})"
    for col in ("token_id", "example_id", "position"):
        if not np.array_equal(a[col].to_numpy(), b[col].to_numpy()):
            return f"token index differs ({col}): the runs did not see the same tokens"
    if base.manifest.get("n_neurons") != other.manifest.get("n_neurons"):
        return "neuron counts differ"
    if not set(base.layers) & set(other.layers):
        return "no layer cached in both runs"
    return None


def pair_drift(
    base: Run, other: Run, *, tap: str = "act", layers: list[int] | None = None
) -> dict[str, np.ndarray]:
    """Per-neuron drift of ``other`` from ``base`` (runs that ``mismatch`` accepts) on each of ``layers``
    (default: every layer cached in both with a dense ``tap``: a mixture-of-experts layer without a shared
    expert has none and is left out), over the token rows both runs have committed.

    Returns flat columns ``layer`` (int32), ``neuron`` (int32), ``r``, ``mad``, ``rel_rms`` (float64), one
    row per layer and neuron. Raises ``InvalidName`` for a layer or tap not cached in either run,
    ``RunMismatch`` when, by default, no layer has a dense ``tap`` (every layer MoE, no shared expert).
    """
    rows = None if base.complete and other.complete else base.rows_done() & other.rows_done()
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ("layer", "neuron", "r", "mad", "rel_rms")}
    if layers is None:
        both = sorted(set(base.layers) & set(other.layers))
        layers = dense_layers([base, other], both, tap, "drift")
        if not layers:
            raise RunMismatch(
                f"nothing to compare in {base.key} and {other.key}: {no_dense_layer(both, tap)}"
            )
    for layer in layers:
        x = base.activations(layer, tap, allow_partial=True)  # committed rows selected below
        y = other.activations(layer, tap, allow_partial=True)
        if rows is not None:  # explicit, not left to the NaN fill of unwritten rows
            x, y = x[rows], y[rows]
        d = layer_drift(x, y)
        cols["layer"].append(np.full(len(d.r), layer, np.int32))
        cols["neuron"].append(np.arange(len(d.r), dtype=np.int32))
        cols["r"].append(d.r)
        cols["mad"].append(d.mad)
        cols["rel_rms"].append(d.rel_rms)
    return {k: np.concatenate(v) for k, v in cols.items()}


def run_drift(
    store: Store | str | Path,
    *,
    tap: str = "act",
    dataset: str | None = None,
    model: str | None = None,
    quant: str | None = None,
    baseline: str | None = None,
    layers: list[int] | None = None,
    allow_partial: bool = False,
    log: Log = print,
) -> tuple[pa.Table, pa.Table]:
    """Write ``activation_drift`` (one file per compared run) and ``drift_skipped``; return both.

    Every (dataset, model) of the store matching ``dataset``/``model`` compares its ``baseline`` run (default
    fp16, else fp32; a group without it is passed over) with each other run, or only the ``quant`` one.
    Raises ``InvalidOption`` when a requested layer is not cached in both runs of a pair.
    """
    s = open_store(store)
    out_root = s.results
    groups: dict[tuple[str, str], dict[str, Run]] = {}
    for k in s.select(dataset=dataset, model=model):
        groups.setdefault((k.dataset, k.model), {})[k.quant] = s.run(k)
    out, skipped = [], []
    for (ds, m), runs in sorted(groups.items()):
        base_q = baseline if baseline is not None else baseline_of(list(runs))
        if base_q is None or base_q not in runs:
            if baseline is not None:
                log(f"{ds}/{m}: no {baseline} run to compare with: skipped")
            continue
        base = runs[base_q]
        for q in sorted(set(runs) - {base_q}, key=_quant_order):
            if quant is not None and q != quant:
                continue
            part = part_name(ds, m, q)
            reason = mismatch(base, runs[q], allow_partial=allow_partial)
            if reason is None and tap not in runs[q].manifest["taps"]:
                reason = f"tap {tap!r} is not cached in {runs[q].key}"
            if reason is not None:
                skipped.append((ds, m, base_q, q, reason))
                _drop(out_root, "activation_drift", part)
                log(f"{ds}/{m}: drift {base_q} -> {q} skipped: {reason}")
                continue
            if layers is not None:
                missing = [n for n in layers if n not in set(base.layers) & set(runs[q].layers)]
                if missing:
                    raise InvalidOption(
                        f"layer(s) {missing} are not cached in both {base.key} (cached: {base.layers}) and "
                        f"{runs[q].key} (cached: {runs[q].layers})"
                    )
            both = sorted(set(base.layers) & set(runs[q].layers))
            if layers is None and not dense_layers([base, runs[q]], both, tap, "drift"):
                skipped.append((ds, m, base_q, q, no_dense_layer(both, tap)))  # one line, as any skip
                _drop(out_root, "activation_drift", part)
                log(f"{ds}/{m}: drift {base_q} -> {q} skipped: {skipped[-1][-1]}")
                continue
            chosen = layers if layers is not None else dense_layers([base, runs[q]], both, tap, "drift", log)
            table = _drift_table(base, runs[q], tap, chosen)
            # stamped with the compared run's creation and the token rows compared (see ``drift_partial``)
            n_rows = int(table["n_tokens"][0].as_py()) if table.num_rows else shared_tokens(base, runs[q])
            write_table(out_root, "activation_drift", part, table, runs[q].creation_id, n_rows)
            _drop(out_root, "drift_skipped", part)
            out.append(table)
            log(f"{ds}/{m}: drift {base_q} -> {q} over {shared_tokens(base, runs[q])} tokens written")
    for row in skipped:
        cols = {c: [v] for c, v in zip(SKIP_COLUMNS, row, strict=True)}
        write_table(out_root, "drift_skipped", part_name(row[0], row[1], row[3]), pa.table(cols))
    drift = pa.concat_tables(out) if out else _empty(DRIFT_COLUMNS)
    skips = (
        pa.Table.from_pylist([dict(zip(SKIP_COLUMNS, row, strict=True)) for row in skipped])
        if skipped
        else _empty(SKIP_COLUMNS)
    )
    return drift, skips


def shared_tokens(base: Run, other: Run) -> int:
    """Token rows committed in both runs: the rows ``pair_drift`` compares (every row once both are done)."""
    if base.complete and other.complete:
        return int(base.layout.n_tokens)
    return int((base.rows_done() & other.rows_done()).sum())


def drift_partial(store: Store, table: pa.Table) -> list[tuple[str, str, str, str, int, int]]:
    """The compared pairs of an ``activation_drift`` table computed on fewer token rows (``n_tokens``, under
    ``--allow-partial``) than both runs have committed now: ``(dataset, model, baseline, quant, rows
    compared, rows now)`` each. Tables written before ``n_tokens`` was recorded say nothing (none listed)."""
    if "n_tokens" not in table.column_names:
        return []
    cols = table.select(["dataset", "model", "baseline", "quant", "n_tokens"]).to_pylist()
    have = set(store.runs())
    out = []
    for ds, m, b, q, n in sorted({tuple(r.values()) for r in cols}):
        keys = [RunKey(ds, m, b), RunKey(ds, m, q)]
        if n is None or not all(k in have for k in keys):
            continue
        now = shared_tokens(store.run(keys[0]), store.run(keys[1]))
        if n < now:
            out.append((ds, m, b, q, int(n), now))
    return out


def _drift_table(base: Run, other: Run, tap: str, layers: list[int] | None = None) -> pa.Table:
    """``activation_drift`` rows of one pair; ``n_tokens``: the token rows compared (int64), fewer than the
    run's under ``--allow-partial`` before both runs finished."""
    flat = pair_drift(base, other, tap=tap, layers=layers)
    n = len(flat["layer"])
    k = other.key
    key = {
        "dataset": [k.dataset] * n,
        "model": [k.model] * n,
        "baseline": [base.key.quant] * n,
        "quant": [k.quant] * n,
    }
    rows = pa.array(np.full(n, shared_tokens(base, other), np.int64))
    return pa.table({**key, **flat, "n_tokens": rows})


def summarize(table: pa.Table) -> pa.Table:
    """Per (dataset, model, baseline, quant, layer) of an ``activation_drift`` table: ``n_neurons``,
    ``n_constant`` (r undefined), median and 5th percentile of the finite r, share of them below 0.9, and
    the medians of ``mad`` and ``rel_rms``; sorted by dataset, model, layer, quantization."""
    d = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    if not table.num_rows:
        return pa.table({c: pa.array([], pa.string()) for c in SUMMARY_COLUMNS})
    keys = sorted(
        {(a, b, c, q, int(n)) for a, b, c, q, n in zip(*(d[c] for c in DRIFT_COLUMNS[:5]), strict=True)},
        key=lambda k: (k[0], k[1], k[4], _quant_order(k[3])),
    )
    rows = []
    for ds, model, base, quant, layer in keys:
        m = (d["dataset"] == ds) & (d["model"] == model) & (d["quant"] == quant) & (d["layer"] == layer)
        m &= d["baseline"] == base
        r, mad, rel = d["r"][m], d["mad"][m], d["rel_rms"][m]
        fin = r[np.isfinite(r)]
        values = (
            int(m.sum()),
            int(r.size - fin.size),
            _stat(np.median, fin),
            _stat(lambda x: np.quantile(x, 0.05), fin),
            float((fin < 0.9).mean()) if fin.size else float("nan"),
            _stat(np.nanmedian, mad),
            _stat(np.nanmedian, rel),
        )
        rows.append(dict(zip(SUMMARY_COLUMNS, (ds, model, base, quant, layer, *values), strict=True)))
    return pa.Table.from_pylist(rows)


def _stat(f: Callable[[np.ndarray], float], x: np.ndarray) -> float:
    return float(f(x)) if x.size and np.isfinite(x).any() else float("nan")


def dead_overlap(store: Store | str | Path, *, log: Log = print) -> pa.Table:
    """Jaccard of the dead-neuron sets between every two quantizations of a model, per layer.

    Reads ``neuron_stats`` (written by ``qcache analyze dead``); writes ``dead_overlap`` per dataset and
    model with columns dataset, model, layer, quant_a, quant_b, n_a, n_b, n_shared, jaccard.
    """
    out_root = open_store(store).results
    files = table_parts(out_root, "neuron_stats")
    sets: dict[tuple[str, str], dict[str, dict[int, set[int]]]] = {}
    for f in files:
        t = read_parquet(f)
        # dense rows only: an MoE layer's per-expert rows (``expert`` set) are other neurons
        expert = t["expert"].to_pylist() if "expert" in t.column_names else [None] * t.num_rows
        tap = t["tap"].to_pylist() if "tap" in t.column_names else [None] * t.num_rows  # act: the paper's
        t = t.select(["dataset", "model", "quant", "layer", "neuron", "dead"]).to_pydict()
        for ds, m, q, layer, neuron, dead, e, tp in zip(*t.values(), expert, tap, strict=True):
            if e is not None or tp not in (None, "act"):
                continue
            per_layer = sets.setdefault((ds, m), {}).setdefault(q, {}).setdefault(layer, set())
            if dead:
                per_layer.add(neuron)
    tables = []
    for (ds, m), by_quant in sorted(sets.items()):
        quants = sorted(by_quant, key=_quant_order)
        rows = []
        for i, qa in enumerate(quants):
            for qb in quants[i + 1 :]:
                for layer in sorted(set(by_quant[qa]) & set(by_quant[qb])):
                    a, b = by_quant[qa][layer], by_quant[qb][layer]
                    union = len(a | b)
                    rows.append(
                        {
                            "dataset": ds,
                            "model": m,
                            "layer": layer,
                            "quant_a": qa,
                            "quant_b": qb,
                            "n_a": len(a),
                            "n_b": len(b),
                            "n_shared": len(a & b),
                            "jaccard": len(a & b) / union if union else float("nan"),
                        }
                    )
        if rows:
            table = pa.Table.from_pylist(rows)
            write_table(out_root, "dead_overlap", part_name(ds, m), table)
            tables.append(table)
            log(f"{ds}/{m}: dead-set overlap of {len(quants)} quantizations written")
    return pa.concat_tables(tables) if tables else _empty(("dataset", "model", "layer", "quant_a", "quant_b"))


def _quant_order(q: str) -> tuple[int, str]:
    return (QUANTS.index(q) if q in QUANTS else len(QUANTS), q)


def _drop(root: StorePath, name: str, part: str) -> None:
    """Remove a stale result file (a pair that is now skipped, or now computed)."""
    (root / "tables" / name / part).unlink(missing_ok=True)


def _empty(names: tuple[str, ...]) -> pa.Table:
    return pa.table({n: pa.array([], pa.string()) for n in names})
