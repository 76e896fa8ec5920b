"""The dead and salient neuron sets of a run, read from its result tables for ``analyze.compare``.

Dead: ``neuron_stats.dead`` (``qcache analyze dead``); salient: neurons with ``n_union > 0`` in
``salient_neurons`` (``qcache analyze salience``), with the selection options of ``salience_counts``
(threshold, repeated tokens, max strategy). A part computed from an earlier creation of the run (stale,
see ``store.tables.part_state``), or on fewer tokens than the run has now (partial), counts as missing: no
set, so no Jaccard index, rather than a wrong one.
"""

from __future__ import annotations

from typing import Any

from qcache.store import Run
from qcache.store.location import read_parquet
from qcache.store.tables import part_name, part_state


def _current(run: Run, name: str, columns: list[str]) -> dict[str, list[Any]] | None:
    """Columns of the run's main part of table ``name`` when it is current, else None."""
    k = run.key
    path = run.store.results / "tables" / name / part_name(k.dataset, k.model, k.quant)
    if part_state(path, run.creation_id, run.tokens_done) != "current":
        return None
    table = read_parquet(path)
    if any(c not in table.column_names for c in columns):
        return None
    if "expert" in table.column_names:  # dense rows only: an MoE layer's per-expert rows are other neurons
        table = table.filter(table["expert"].is_null())
    return table.select(columns).to_pydict()


def neuron_sets(run: Run) -> dict[str, Any]:
    """``{"dead": {layer: set}, "salient": {layer: set}, "salient_options": tuple | None}``.

    A layer absent from a table has no entry (its Jaccard index is then undefined); a layer present with
    no dead or salient neuron maps to an empty set.
    """
    out: dict[str, Any] = {"dead": {}, "salient": {}, "salient_options": None}
    stats = _current(run, "neuron_stats", ["layer", "neuron", "dead"])
    if stats is not None:
        for layer, neuron, dead in zip(stats["layer"], stats["neuron"], stats["dead"], strict=True):
            layer_set = out["dead"].setdefault(int(layer), set())
            if dead:
                layer_set.add(int(neuron))
    counts = _current(run, "salience_counts", ["layer", "threshold", "repeated_tokens", "max_of"])
    salient = _current(run, "salient_neurons", ["layer", "neuron", "n_union"])
    if counts is None or salient is None:
        return out
    options = {
        (float(t), str(r), str(m))
        for t, r, m in zip(counts["threshold"], counts["repeated_tokens"], counts["max_of"], strict=True)
    }
    out["salient_options"] = options.pop() if len(options) == 1 else None
    for layer in counts["layer"]:
        out["salient"].setdefault(int(layer), set())  # every analyzed layer, even with no salient neuron
    for layer, neuron, n in zip(salient["layer"], salient["neuron"], salient["n_union"], strict=True):
        if n > 0:
            out["salient"].setdefault(int(layer), set()).add(int(neuron))
    return out
