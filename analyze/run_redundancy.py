"""`qcache analyze redundancy`: the redundancy tables of each selected run (computed by redundancy.py)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pyarrow as pa

from . import experts, gram_terms, redundancy
from .scheduler import scheduler
from .selection import REDUNDANCY_VARIANT, AnalyzeConfig, Log, chosen_layers, select_runs, write_rows


def run_redundancy(cfg: AnalyzeConfig, log: Log = print) -> pa.Table:
    """|r| histograms and pairs above the threshold per layer (and across layers) for every run; an MoE
    layer gets rows per expert over the committed tokens routed to it (``expert``, ``n_tokens``), and an
    expert with fewer than two tokens (or examples, ``--per-example``) a summary row of null counts."""
    summaries = []
    need = experts.MIN_TOKENS["redundancy"]
    with scheduler(cfg.scheduler, memory_limit=cfg.memory_limit):
        for run in select_runs(cfg):
            layers = chosen_layers(run, cfg)
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
            # rows of layers not analysed now are kept when computed the same way (selection.write_part)
            options = {"tap": cfg.tap, "corr_threshold": cfg.corr_threshold, "cross_layer": cfg.cross_layer}
            same = {"layers": layers, "options": options}
            write_rows(run, "redundancy", hist_names, hist, variant, **same)
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
            summaries.append(write_rows(run, "redundancy_summary", names, summ, variant, **same))
            gram_terms.record(run, terms)
            if cfg.top_pairs:
                write_rows(
                    run,
                    "redundancy_top_pairs",
                    ("layer", "layer_b", "unit", "rank", "neuron_a", "neuron_b", "abs_r", "expert"),
                    tops,
                    variant,
                    layers=layers,
                    options={**options, "top_pairs": cfg.top_pairs},
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
