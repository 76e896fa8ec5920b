"""What a store holds, for ``qcache ls``: one row per cached array, with run progress."""

from __future__ import annotations

from typing import Any

from .keys import TAP_ARRAYS
from .store import Store


def describe_store(store: Store) -> list[dict[str, Any]]:
    """Rows of ``dataset, model, quant, layer, array, shape, dtype, progress, size_mb``."""
    rows = []
    for key in store.runs():
        run = store.run(key)
        m = run.manifest
        done, total = len(run.done_units()), run.layout.n_units
        names = [a for t, a in TAP_ARRAYS.items() if t in m["taps"]]
        if m.get("attributions"):
            names.append("attributions")
        for layer in run.layers:
            for name in names:
                what = "attributions" if name == "attributions" else next(t for t, a in TAP_ARRAYS.items() if a == name)
                arr = run.zarr_array(layer, what)
                path = run.dir / run.array_path(layer, what)
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                rows.append(
                    {
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
                )
    return rows
