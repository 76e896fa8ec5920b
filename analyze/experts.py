"""What a per-layer analysis runs over: a layer's dense tap, or each expert of a mixture-of-experts layer on
the committed tokens routed to it.

An MoE layer (store/experts.py) stores each expert's values in a full ``(token, neuron)`` array that is NaN
wherever the expert was not routed. Analysing that array whole would mix NaN rows into every statistic, so
each expert is analysed on the rows its router sent to it: rows selected from ``router/topk_ids`` and the
committed-unit mask (never from NaN, which also marks uncommitted rows), by Dask's boolean row indexing
with a numpy mask, which keeps the selected row count exact and the analyses' formulas (means, centred
Gram products, counts) unchanged: they see an ``(n_e, neurons)`` matrix of the expert's tokens.

A shared expert (applied to every token) is the layer's ordinary dense tap, analysed as a dense layer
(``expert`` None). ``resid`` is always dense.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import dask.array as da
import numpy as np

from qcache.store import Run
from qcache.store.experts import EXPERT_ARRAYS, routed_mask

Log = Callable[[str], None]

# Fewest tokens an expert must have seen for a meaningful figure: one activation decides dead/alive;
# a Pearson correlation needs two rows (with one, every neuron is constant).
MIN_TOKENS = {"dead": 1, "redundancy": 2}


@dataclass(frozen=True)
class Part:
    """One array a per-layer analysis runs over.

    ``x``: ``(n_tokens, neurons)`` lazy rows (the stored dtype); ``expert``: None for a dense tap (a dense
    layer, a shared expert, resid), else the 0-based expert; ``rows``: ``(tokens,)`` bool mask of the run's
    token axis that ``x`` holds, None for every row.
    """

    layer: int
    expert: int | None
    x: da.Array
    rows: np.ndarray | None

    @property
    def n_tokens(self) -> int:
        return int(self.x.shape[0])


def has_dense(run: Run, layer: int, tap: str) -> bool:
    """Whether ``layer`` has a dense ``tap`` array (false only for an MoE layer's expert taps without a
    shared expert)."""
    entry = run.moe_layers.get(layer)
    return entry is None or tap not in EXPERT_ARRAYS or bool(entry.get("shared_expert"))


def layer_parts(run: Run, layer: int, tap: str, log: Log = print) -> Iterator[Part]:
    """The dense part of ``layer`` (if any), then, for an MoE layer and an expert tap, one part per expert
    over the committed rows routed to it. Lazy: nothing but the router ids is read here."""
    done = None if run.complete else run.rows_done()
    if has_dense(run, layer, tap):
        x = run.activations(layer, tap, allow_partial=True)  # the committed rows are selected below
        yield Part(layer, None, x if done is None else x[done], done)
    entry = run.moe_layers.get(layer)
    if entry is None or tap not in EXPERT_ARRAYS:
        return
    ids = np.asarray(run.router(layer)[0].compute())
    for e in range(int(entry["n_experts"])):
        rows = routed_mask(ids, e, done)
        x = run.expert_activations(layer, e, tap)
        yield Part(layer, e, x if rows.all() else x[rows], rows)


def partial_note(run: Run, log: Log) -> None:
    """Say, once per run, that an unfinished run is analysed on its committed rows."""
    if not run.complete:
        share = 100 * run.rows_done().mean()
        log(f"{run.key}: using the {share:.1f}% of tokens extracted so far (--allow-partial)")


def expert_line(run: Run, layer: int, counts: list[int], what: str, need: int) -> str:
    """One log line per MoE layer: how many tokens its experts saw and how many had too few."""
    few = sum(c < need for c in counts)
    too_few = "no token" if need == 1 else f"fewer than {need} tokens"
    short = f", {few} saw {too_few}: no figure" if few else ""
    seen = f"{min(counts)}-{max(counts)} tokens"
    return f"{run.key} layer {layer}: {len(counts)} experts saw {seen}{short}; {what}"


def dense_layers(
    runs: list[Run], layers: list[int], tap: str, what: str, log: Log | None = None
) -> list[int]:
    """``layers`` less those where a run has no dense ``tap`` (MoE layers without a shared expert): analyses
    that compare whole layers (drift, CKA) have no per-expert form; ``log`` says which were left out."""
    out = [n for n in layers if all(has_dense(run, n, tap) for run in runs)]
    left = [n for n in layers if n not in out]
    if left and log is not None:
        log(
            f"{runs[-1].key}: layers {left} are mixture-of-experts layers without a shared expert, left out "
            f"of {what}, which has no per-expert form (`qcache analyze dead|redundancy` analyze the experts)"
        )
    return out


def no_dense_layer(layers: list[int], tap: str) -> str:
    """Why a pair of runs whose ``layers`` are all MoE layers without a shared expert has nothing to compare
    at ``tap``."""
    return (
        f"every layer cached in both ({layers}) is a mixture-of-experts layer without a shared expert: no "
        f"dense {tap!r} array to compare (`qcache analyze dead|redundancy` analyze the experts)"
    )
