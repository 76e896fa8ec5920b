"""Salient neurons from stored Integrated-Gradients attributions (the paper's sections 2.3 and 4.3).

Per example and layer, with A the (tokens, neurons) attributions and |A| their magnitudes:

* ``best_token``: |A| of the most attributed token, the token maximizing sum_j A[i, j] (signed, as the
  paper's a_i = sum_j n_j);
* ``sum``: sum over tokens of |A| (the authors' code takes the magnitude before summing);
* ``max``: maximum over tokens of |A| (token-agnostic);
* ``mean``: mean over tokens of |A| (the authors' code adds it; after normalization by its maximum it
  selects exactly what ``sum`` selects, and is kept for parity).

Each score vector is divided by its maximum and neurons strictly above ``threshold`` are salient
(the paper's text: 0.8; the authors' code: 0.7). A neuron salient under any strategy is in the example's
union; the paper's Table 3 counts the distinct neurons in the union over the dataset.

Two options reproduce the authors' code (src/2_extract_important_neuron.py) where it differs:

* ``repeated_tokens="last"``: their attributions are a dict keyed by the token's vocabulary string
  (Captum's ``TextTokenInput.values``, ``convert_ids_to_tokens``), so a token that occurs more than once
  keeps only its last position, and ``mean`` divides by the number of distinct tokens. The store holds
  token ids; a vocabulary string maps to one id (SmolLM2: 49,152 ids, 49,152 distinct strings), so keying
  by id keeps the same rows. The kept rows are ordered by first occurrence, the dict's order, which only
  decides exact ties of the best token. Default ``"all"``: every position counts.
* ``max_of="signed"``: their ``max`` takes the signed maximum over tokens, then its magnitude; default
  ``"abs"``: the maximum of |A|.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from qcache.store import Run
from qcache.store.errors import InvalidName, InvalidOption
from qcache.store.location import StorePath
from qcache.store.tables import part_name, write_table

STRATEGIES = ("best_token", "sum", "max", "mean")
REPEATED_TOKENS = ("all", "last")  # every position / the last position of each distinct token (authors)
MAX_OF = ("abs", "signed")  # max of |A| / |max of signed A| (authors)
BLOCK_ROWS = 8192  # token rows read at once (whole examples)


def select(
    attr: np.ndarray,
    threshold: float = 0.8,
    *,
    token_ids: np.ndarray | None = None,
    max_of: str = "abs",
) -> dict[str, np.ndarray]:
    """Salient-neuron masks of one example: ``(tokens, neurons)`` attributions -> strategy -> (neurons,) bool.

    ``token_ids`` (``(tokens,)`` ints), when given, keeps only the last position of each distinct token
    (``repeated_tokens="last"``); ``max_of`` is ``"abs"`` or ``"signed"`` (see the module docstring).

    >>> a = np.array([[0.1, -0.2, 0.3], [0.5, 0.1, -0.2], [0.2, 0.6, 0.3]])
    >>> {k: np.flatnonzero(v).tolist() for k, v in select(a).items()}
    {'best_token': [1], 'sum': [0, 1, 2], 'max': [0, 1], 'mean': [0, 1, 2]}
    """
    _check_options("all" if token_ids is None else "last", max_of)
    starts, lengths = np.array([0]), np.array([len(attr)])
    if token_ids is not None:
        rows, lengths = last_occurrences(np.asarray(token_ids), starts, lengths)
        attr = attr[rows]
    scores = _scores(attr[None], starts, lengths, max_of)
    return {k: _above(v, threshold)[0] for k, v in scores.items()}


def last_occurrences(
    token_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows kept when each example's attributions are keyed by token (the authors' dict): the last position
    of each distinct token, ordered by the token's first position. Returns ``(rows, lengths)``: row indices
    into ``token_ids`` (int64) and the number of distinct tokens per example."""
    rows, counts = [], []
    for s, n in zip(starts, lengths, strict=True):
        ids = token_ids[s : s + n]
        _, first = np.unique(ids, return_index=True)
        _, last_rev = np.unique(ids[::-1], return_index=True)  # same sorted ids, so the same order
        order = np.argsort(first, kind="stable")
        rows.append(s + (n - 1 - last_rev)[order])
        counts.append(len(first))
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), np.array(counts, np.int64)


def _check_options(repeated_tokens: str, max_of: str) -> None:
    if repeated_tokens not in REPEATED_TOKENS:
        raise InvalidOption(
            f"--repeated-tokens {repeated_tokens!r} is not one of {', '.join(REPEATED_TOKENS)}"
        )
    if max_of not in MAX_OF:
        raise InvalidOption(f"--max-of {max_of!r} is not one of {', '.join(MAX_OF)}")


def _scores(
    block: np.ndarray, starts: np.ndarray, lengths: np.ndarray, max_of: str = "abs"
) -> dict[str, np.ndarray]:
    """Scores of the examples laid out in ``block`` at ``starts``: strategy -> (examples, neurons)."""
    flat = block.reshape(-1, block.shape[-1]).astype(np.float32, copy=False)  # (rows, neurons)
    mag = np.abs(flat)
    total = np.add.reduceat(mag, starts, axis=0)
    token_score = flat.sum(axis=1)  # (rows,) signed token attribution a_i
    best = np.array(
        [s + int(np.argmax(token_score[s : s + n])) for s, n in zip(starts, lengths, strict=True)]
    )
    peak = (
        np.maximum.reduceat(mag, starts, axis=0)
        if max_of == "abs"
        else np.abs(np.maximum.reduceat(flat, starts, axis=0))
    )
    return {"best_token": mag[best], "sum": total, "max": peak, "mean": total / lengths[:, None]}


def _above(scores: np.ndarray, threshold: float) -> np.ndarray:
    top = scores.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (top > 0) & (scores / np.where(top > 0, top, 1) > threshold)


@dataclass(frozen=True)
class Salience:
    """Salient neurons of one run: per-neuron example counts and per-layer totals."""

    run: Run
    threshold: float
    neurons: pa.Table  # layer, neuron, n_best_token, n_sum, n_max, n_mean, n_union (selected neurons only)
    # layer, strategy, n_salient, n_neurons, n_examples, threshold, repeated_tokens, max_of (Table 3)
    counts: pa.Table
    repeated_tokens: str = "all"
    max_of: str = "abs"

    def salient_sets(self) -> dict[tuple[int, str], set[int]]:
        """(layer, strategy or 'union') -> neurons selected by at least one example."""
        cols = self.neurons.to_pydict()
        out: dict[tuple[int, str], set[int]] = {}
        for i, (layer, neuron) in enumerate(zip(cols["layer"], cols["neuron"], strict=True)):
            for s in (*STRATEGIES, "union"):
                if cols[f"n_{s}"][i] > 0:
                    out.setdefault((layer, s), set()).add(neuron)
        return out


def salience(
    run: Run,
    *,
    threshold: float = 0.8,
    layers: list[int] | None = None,
    allow_partial: bool = False,
    repeated_tokens: str = "all",
    max_of: str = "abs",
) -> Salience:
    """Select salient neurons per example and collate them over the run's examples.

    ``repeated_tokens`` (``all`` or ``last``) and ``max_of`` (``abs`` or ``signed``): see the module
    docstring. Raises InvalidOption on a bad threshold or option, InvalidName on a run without attributions.
    """
    if not 0 <= threshold < 1:
        raise InvalidOption(f"--threshold {threshold} must be in [0, 1)")
    _check_options(repeated_tokens, max_of)
    if not run.manifest.get("attributions"):
        raise InvalidName(
            f"run {run.key} has no attributions: extract it with --attributions or `qcache attribute`"
        )
    run.require_complete(allow_partial)
    layers = run.layers if layers is None else layers
    layout = run.layout
    done = run.rows_done()
    ends = layout.starts + layout.lengths
    ready = np.array([bool(done[s:e].all()) for s, e in zip(layout.starts, ends, strict=True)], dtype=bool)
    n_neurons = int(run.manifest["n_neurons"])
    examples = np.flatnonzero(ready)
    token_ids = run.token_index()["token_id"].to_numpy() if repeated_tokens == "last" else None
    neuron_rows: dict[str, list[np.ndarray]] = {
        k: [] for k in ("layer", "neuron", *(f"n_{s}" for s in (*STRATEGIES, "union")))
    }
    count_rows: list[dict[str, object]] = []
    for layer in layers:
        arr = run.attributions(layer, allow_partial=True)  # (require_complete above; rows masked)
        hits = {s: np.zeros(n_neurons, np.int64) for s in (*STRATEGIES, "union")}
        for block in _blocks(examples, layout.starts, layout.lengths):
            r0, r1 = int(layout.starts[block[0]]), int(ends[block[-1]])
            data = np.asarray(arr[r0:r1].compute())  # (rows, neurons)
            keep = np.concatenate([np.arange(layout.starts[e] - r0, ends[e] - r0) for e in block])
            lengths = layout.lengths[block].astype(np.int64)
            if token_ids is not None:
                own_starts = layout.starts[block].astype(np.int64) - r0
                keep, lengths = last_occurrences(token_ids[r0:r1], own_starts, lengths)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            scores = _scores(data[keep], starts, lengths, max_of)
            masks = {s: _above(v, threshold) for s, v in scores.items()}
            union = np.logical_or.reduce([masks[s] for s in STRATEGIES])
            for s in STRATEGIES:
                hits[s] += masks[s].sum(axis=0)
            hits["union"] += union.sum(axis=0)
        selected = np.flatnonzero(hits["union"])
        neuron_rows["layer"].append(np.full(len(selected), layer, np.int32))
        neuron_rows["neuron"].append(selected.astype(np.int32))
        for s, h in hits.items():
            neuron_rows[f"n_{s}"].append(h[selected].astype(np.int32))
            count_rows.append(
                {
                    "layer": layer,
                    "strategy": s,
                    "n_salient": int((h > 0).sum()),
                    "n_neurons": n_neurons,
                    "n_examples": len(examples),
                    "threshold": threshold,
                    "repeated_tokens": repeated_tokens,
                    "max_of": max_of,
                }
            )
    neurons = pa.table({k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in neuron_rows.items()})
    return Salience(run, threshold, neurons, pa.Table.from_pylist(count_rows), repeated_tokens, max_of)


def _blocks(examples: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of whole examples of about ``BLOCK_ROWS`` rows (an example is never split)."""
    out, cur, rows = [], [], 0
    for e in examples:
        if cur and (rows + lengths[e] > BLOCK_ROWS or e != cur[-1] + 1):
            out.append(np.array(cur))
            cur, rows = [], 0
        cur.append(int(e))
        rows += int(lengths[e])
    if cur:
        out.append(np.array(cur))
    return out


def overlap(results: list[Salience]) -> pa.Table:
    """Shared salient neurons between every pair of runs of the same dataset and model (other quant).

    Rows: dataset, model, layer, strategy, quant_a, quant_b, n_a, n_b, n_shared, jaccard, threshold_a,
    threshold_b, options_a, options_b (``repeated_tokens/max_of`` of each side).
    """
    rows = []
    for i, a in enumerate(results):
        for b in results[i + 1 :]:
            ka, kb = a.run.key, b.run.key
            if (ka.dataset, ka.model) != (kb.dataset, kb.model):
                continue
            sa, sb = a.salient_sets(), b.salient_sets()
            for layer in sorted(set(a.run.layers) & set(b.run.layers)):
                for s in (*STRATEGIES, "union"):
                    x, y = sa.get((layer, s), set()), sb.get((layer, s), set())
                    both = len(x | y)
                    rows.append(
                        {
                            "dataset": ka.dataset,
                            "model": ka.model,
                            "layer": layer,
                            "strategy": s,
                            "quant_a": ka.quant,
                            "quant_b": kb.quant,
                            "n_a": len(x),
                            "n_b": len(y),
                            "n_shared": len(x & y),
                            "jaccard": len(x & y) / both if both else float("nan"),
                            "threshold_a": a.threshold,
                            "threshold_b": b.threshold,
                            "options_a": f"{a.repeated_tokens}/{a.max_of}",
                            "options_b": f"{b.repeated_tokens}/{b.max_of}",
                        }
                    )
    return pa.Table.from_pylist(rows) if rows else pa.table({"dataset": pa.array([], pa.string())})


def write_tables(root: StorePath, results: list[Salience], pairs: pa.Table | None = None) -> list[StorePath]:
    """Write ``tables/salient_neurons``, ``tables/salience_counts`` (one Parquet file per run) and
    ``tables/salience_overlap`` (one per dataset and model) under the store ``root``, atomically."""
    written = []
    for r in results:
        k = r.run.key
        for name, table in (("salient_neurons", r.neurons), ("salience_counts", r.counts)):
            keyed = _with_key(table, dataset=k.dataset, model=k.model, quant=k.quant)
            part = part_name(k.dataset, k.model, k.quant)
            written.append(write_table(root, name, part, keyed, r.run.creation_id, r.run.tokens_done))
    if pairs is not None and pairs.num_rows and "model" in pairs.column_names:
        cols = pairs.to_pydict()
        for dataset, model in sorted(set(zip(cols["dataset"], cols["model"], strict=True))):
            mask = [d == dataset and m == model for d, m in zip(cols["dataset"], cols["model"], strict=True)]
            part = pairs.filter(pa.array(mask))
            written.append(write_table(root, "salience_overlap", part_name(dataset, model), part))
    return written


def _with_key(table: pa.Table, **key: str) -> pa.Table:
    for i, (name, value) in enumerate(key.items()):
        table = table.add_column(i, name, pa.array([value] * table.num_rows, pa.string()))
    return table
