"""Synthetic mixture-of-experts runs on disk, laid out as the store contract says (docs/store.md,
"Mixture-of-experts layers"), for the read API and the per-expert analyses.

A normal run is written through the real ``RunWriter`` (``tests.synthetic.write_run``: its dense layers, and
a shared expert's tap as an MoE layer's dense ``activations``); then each MoE layer's expert and router
arrays are created with zarr at the contract's paths and filled unit by unit, and ``manifest["moe"]`` is
added. Independent of qcache's MoE code: the oracles in the tests use the ``MoELayer`` arrays directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from qcache import store
from tests.synthetic import write_run


@dataclass
class MoELayer:
    """One MoE layer: every expert's values on every token (``acts``: ``(n_experts, tokens, neurons)``,
    finite; the store keeps only routed rows) and the routing (``ids``: ``(tokens, top_k)``)."""

    acts: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    shared: np.ndarray | None = None  # (tokens, dense neurons): the shared expert's activations


def random_layer(
    seed: int, n_tokens: int, *, n_experts: int = 6, top_k: int = 2, d: int = 24, shared_d: int | None = None
) -> MoELayer:
    """Random routing over experts ``0 .. n_experts - 3``; expert ``n_experts - 2`` gets exactly one token,
    expert ``n_experts - 1`` none. Each expert has a dead neuron (|a| <= 0.1), a neuron dead on its routed
    rows only (large elsewhere), a correlated pair and a constant neuron."""
    rng = np.random.default_rng(seed)
    busy = n_experts - 2
    ids = np.stack([rng.choice(busy, size=top_k, replace=False) for _ in range(n_tokens)]).astype(np.int16)
    ids[n_tokens // 2, -1] = n_experts - 2  # the lone token of expert n_experts - 2
    acts = rng.standard_normal((n_experts, n_tokens, d)) * rng.uniform(0.05, 2.0, (n_experts, 1, d)) + 1.5
    routed = np.zeros((n_experts, n_tokens), bool)
    for e in range(n_experts):
        routed[e] = (ids == e).any(axis=1)
    acts[:, :, 0] = rng.uniform(-0.1, 0.1, (n_experts, n_tokens))  # dead everywhere
    small = rng.uniform(-0.05, 0.05, (n_experts, n_tokens))
    acts[:, :, 1] = np.where(routed, small, 7.0)  # dead on its routed rows only
    acts[:, :, 2] = 3 * acts[:, :, 3] - 1  # r = 1
    acts[:, :, 4] = 0.5  # constant
    weights = rng.dirichlet(np.ones(top_k), size=n_tokens).astype(np.float32)
    shared = None if shared_d is None else rng.standard_normal((n_tokens, shared_d)).astype(np.float32)
    return MoELayer(acts.astype(np.float32), ids, weights, shared)


def write_moe_run(
    root: Path,
    lengths: np.ndarray,
    dense: dict[int, np.ndarray],
    moe: dict[int, MoELayer],
    *,
    units: list[int] | None = None,
    leaked: tuple[int, ...] = (),
    chunk_rows: int = 16,
    **kw: object,
) -> store.Run:
    """A run with dense layers ``dense`` and MoE layers ``moe``; only ``units`` (default all) are committed.
    The rows of the units in ``leaked`` are written (experts and router) but not committed, as by a crash
    before the commit: analyses must leave them out."""
    shared = {n: m.shared for n, m in moe.items() if m.shared is not None}
    run = write_run(root, {**dense, **shared}, lengths, units=units, chunk_rows=chunk_rows, **kw)
    layout = run.layout
    committed = set(range(layout.n_units) if units is None else units)
    written = sorted(committed | set(leaked))
    group = zarr.open_group(str(run.dir), mode="r+", zarr_format=3)
    for n, m in moe.items():
        n_experts, n_tokens, d = m.acts.shape
        base = f"layers/L{n:03d}"
        ids = _array(group, f"{base}/router/topk_ids", m.ids.shape, "int16", -1, "topk", chunk_rows)
        wts = _array(group, f"{base}/router/topk_weights", m.ids.shape, "float32", np.nan, "topk", chunk_rows)
        experts = [
            _array(
                group,
                f"{base}/experts/E{e:03d}/activations",
                (n_tokens, d),
                "float32",
                np.nan,
                "neuron",
                chunk_rows,
            )
            for e in range(n_experts)
        ]
        for u in written:
            r0, r1 = layout.unit_rows(u)
            ids[r0:r1] = m.ids[r0:r1]
            wts[r0:r1] = m.weights[r0:r1]
            for e, arr in enumerate(experts):
                routed = (m.ids[r0:r1] == e).any(axis=1)
                values = np.where(routed[:, None], m.acts[e, r0:r1], np.nan)
                if u not in committed:
                    values[routed, 0] = 9.0  # would wake the dead neuron 0 if these rows were counted
                arr[r0:r1] = values
    manifest = dict(group.attrs["manifest"])
    manifest["layers"] = sorted(set(manifest["layers"]) | set(moe))
    manifest["moe"] = {
        str(n): {
            "n_experts": int(m.acts.shape[0]),
            "top_k": int(m.ids.shape[1]),
            "expert_neurons": int(m.acts.shape[2]),
            "shared_expert": m.shared is not None,
            "experts_module": f"model.layers.{n - 1}.mlp.experts",
            "router_module": f"model.layers.{n - 1}.mlp.gate",
            "experts_quantized": False,
            "expert_taps": ["act"],
        }
        for n, m in moe.items()
    }
    group.attrs["manifest"] = manifest
    return store.open(root).run(run.key)


def _array(
    group: zarr.Group, path: str, shape: tuple[int, int], dtype: str, fill: float, dim: str, rows: int
) -> zarr.Array:
    """A ``(token, dim)`` array chunked and compressed as qcache's own (Blosc lz4 bitshuffle)."""
    return group.create_array(
        path,
        shape=shape,
        chunks=(rows, shape[1]),
        dtype=dtype,
        fill_value=fill,
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        dimension_names=("token", dim),
    )


def routed_rows(m: MoELayer, expert: int, committed: np.ndarray) -> np.ndarray:
    """Oracle: ``(tokens,)`` bool, committed rows whose routing lists ``expert``."""
    return (m.ids == expert).any(axis=1) & committed
