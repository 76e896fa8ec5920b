"""What a store holds, for ``qcache ls``: one row per cached array, with run progress."""

from __future__ import annotations

from typing import Any

import numpy as np

from .keys import TAP_ARRAYS
from .location import tree_size
from .reader import Run
from .store import Store

# An example's integration counts as not converged at a layer when |ig_delta| > IG_RTOL * |ig_gap| + IG_ATOL,
# ig_gap = F(x) - F(x; tap = a0) being what the attributions should sum to (objective units).
IG_RTOL = 0.05
IG_ATOL = 1e-3


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
    """Rows of ``dataset, model, quant, layer, array, shape, dtype, progress, size_mb`` (+ IG convergence)."""
    rows = []
    for key in store.runs():
        run = store.run(key)
        m = run.manifest
        done, total = len(run.done_units()), run.layout.n_units
        names = [a for t, a in TAP_ARRAYS.items() if t in m["taps"]]
        unconverged: dict[int, tuple[int, int]] = {}
        if m.get("attributions"):
            names.append("attributions")
            unconverged = ig_unconverged(run, ig_rtol, ig_atol)
        for layer in run.layers:
            for name in names:
                what = (
                    "attributions"
                    if name == "attributions"
                    else next(t for t, a in TAP_ARRAYS.items() if a == name)
                )
                arr = run.zarr_array(layer, what)
                size = tree_size(run.dir / run.array_path(layer, what))
                row = {
                    "dataset": key.dataset,
                    "model": key.model,
                    "quant": key.quant,
                    "layer": layer,
                    "array": name,
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                    "units_done": done,
                    "units_total": total,
                    "progress": round(done / total, 4) if total else 1.0,
                    "size_mb": round(size / 2**20, 3),
                    "examples": m["n_examples"],
                    "activation": m["activation"],
                }
                if name == "attributions":
                    row["ig_unconverged"], row["ig_examples"] = unconverged[layer]
                rows.append(row)
    return rows
