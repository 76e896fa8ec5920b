"""What a store holds, for ``qcache ls``: one row per cached array, with run progress."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import experts
from .keys import ROUTER_IDS, ROUTER_WEIGHTS, TAP_ARRAYS, expert_array_path, router_array_path
from .location import tree_size
from .reader import Run, _open
from .store import Store

# An example's integration counts as not converged at a layer when |ig_delta| > IG_RTOL * |ig_gap| + IG_ATOL,
# ig_gap = F(x) - F(x; tap = a0) being what the attributions should sum to (objective units).
IG_RTOL = 0.05
IG_ATOL = 1e-3
# the order of a row's fields (the IG ones only in rows of attributed runs)
_COLUMNS = ["dataset", "model", "quant", "layer", "array", "shape", "dtype", "units_done", "units_total"]
_COLUMNS += ["progress", "size_mb", "examples", "activation", "ig_unconverged", "ig_examples"]


def ig_unconverged(run: Run, rtol: float = IG_RTOL, atol: float = IG_ATOL) -> dict[int, tuple[int, int]]:
    """Per attributed layer: (examples over the tolerance, examples with attributions so far)."""
    table = run.predictions()
    if "ig_delta" not in table.column_names:
        return {n: (0, 0) for n in run.layers}
    delta = np.asarray(table["ig_delta"].to_pylist(), dtype=np.float64).reshape(table.num_rows, -1)
    gap = np.asarray(table["ig_gap"].to_pylist(), dtype=np.float64).reshape(table.num_rows, -1)
    over = ~(np.abs(delta) <= rtol * np.abs(gap) + atol)  # NaN counts as over
    return {n: (int(over[:, i].sum()), table.num_rows) for i, n in enumerate(run.layers)}


def describe_store(store: Store, ig_rtol: float = IG_RTOL, ig_atol: float = IG_ATOL) -> list[dict[str, Any]]:
    """Rows of ``dataset, model, quant, layer, array, shape, dtype, progress, size_mb`` (+ IG convergence).

    A mixture-of-experts layer lists, besides its dense arrays (``resid``; ``activations``/``down_in`` only
    with a shared expert), one row per expert tap (``experts/activations``: shape ``[n_experts, tokens,
    neurons]``, size summed over the experts) and one per router array (``router/topk_ids``,
    ``router/topk_weights``); docs/store.md, "Mixture-of-experts layers"."""
    rows = []
    for key in store.runs():
        run = store.run(key)
        m = run.manifest
        done, total = len(run.done_units()), run.layout.n_units
        common = {
            "dataset": key.dataset,
            "model": key.model,
            "quant": key.quant,
            "units_done": done,
            "units_total": total,
            "progress": round(done / total, 4) if total else 1.0,
            "examples": m["n_examples"],
            "activation": m["activation"],
        }
        taps = [t for t in TAP_ARRAYS if t in m["taps"]]
        unconverged: dict[int, tuple[int, int]] = {}
        if m.get("attributions"):
            taps.append("attributions")
            unconverged = ig_unconverged(run, ig_rtol, ig_atol)
        moe = experts.moe_layers(m)
        for layer in run.layers:
            for what in taps:
                if experts.dense_refusal(m, layer, what, key) is not None:
                    continue  # an MoE layer without a shared expert: no dense array for this tap
                path = run.array_path(layer, what)
                arr = _open(run.dir / path)
                row = {**common, "layer": layer, "array": path.rsplit("/", 1)[-1]}
                row.update(_sized(arr.shape, arr.dtype, tree_size(run.dir / path)))
                if what == "attributions":
                    row["ig_unconverged"], row["ig_examples"] = unconverged[layer]
                rows.append(row)
            if layer in moe:
                rows.extend({**common, "layer": layer, **r} for r in _moe_rows(run, layer, moe[layer]))
    return [{k: r[k] for k in _COLUMNS if k in r} for r in rows]


def _sized(shape: tuple[int, ...], dtype: object, size: int) -> dict[str, Any]:
    return {"shape": list(shape), "dtype": str(dtype), "size_mb": round(size / 2**20, 3)}


def _moe_rows(run: Run, layer: int, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """``array, shape, dtype, size_mb`` of MoE ``layer``'s expert taps (all experts in one row: shape
    ``[n_experts, tokens, neurons]``) and of its two router arrays (``[tokens, top_k]`` each)."""
    rows = []
    n = int(entry["n_experts"])
    for tap in entry.get("expert_taps") or []:
        paths = [expert_array_path(layer, e, tap) for e in range(n)]
        first = _open(run.dir / paths[0])
        size = sum(tree_size(run.dir / p) for p in paths)
        name = f"experts/{TAP_ARRAYS[tap]}"
        rows.append({"array": name, **_sized((n, *first.shape), first.dtype, size)})
    for which in (ROUTER_IDS, ROUTER_WEIGHTS):
        path = router_array_path(layer, which)
        arr = _open(run.dir / path)
        rows.append({"array": f"router/{which}", **_sized(arr.shape, arr.dtype, tree_size(run.dir / path))})
    return rows
