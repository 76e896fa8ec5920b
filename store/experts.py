"""Mixture-of-experts layers of a run: where their arrays live and which tokens each expert saw.

The store contract (docs/store.md, "Mixture-of-experts layers"): an MoE layer ``L`` holds, besides the
ordinary ``resid`` (and the shared expert's dense ``activations``/``down_in`` when the layer has one),

* ``layers/L{L:03d}/experts/E{e:03d}/activations`` and ``.../down_in``: ``(token, neuron)`` float, the
  expert's values on the tokens routed to it, NaN in every other row;
* ``layers/L{L:03d}/router/topk_ids``: ``(token, topk)`` int16, fill -1: the experts each token went to;
* ``layers/L{L:03d}/router/topk_weights``: ``(token, topk)`` float32, fill NaN: their mixing weights;

and ``manifest["moe"]`` describes it (keys: 1-based layer numbers as strings). A token is routed to expert
``e`` iff ``e`` is in its ``topk_ids`` row; analyses select rows from there and from the committed-unit
mask, never from NaN (rows of uncommitted units are NaN as well).

Functions here are pure (manifest dicts and numpy arrays in, paths and masks out); ``reader.Run`` exposes
them as ``moe_layers``, ``expert_activations``, ``router``, ``expert_tokens`` and ``routed_rows``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DataError, InvalidName
from .keys import ROUTER_IDS, ROUTER_WEIGHTS, check_layer, expert_array_path, router_array_path

# Taps an expert can store (its group holds the dense taps' array names, docs/store.md)
EXPERT_ARRAYS = {"act": "activations", "down-in": "down_in"}


def moe_layers(manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """``{layer: entry}`` of ``manifest["moe"]`` with int keys (1-based); ``{}`` for a dense run."""
    return {int(k): dict(v) for k, v in (manifest.get("moe") or {}).items()}


def moe_entry(manifest: dict[str, Any], layer: int, run: object) -> dict[str, Any]:
    """The manifest entry of MoE ``layer``; raises ``InvalidName`` when ``layer`` is not an MoE layer of
    ``run`` (named in the message)."""
    layers = moe_layers(manifest)
    if check_layer(layer) not in layers:
        have = f"its mixture-of-experts layers are {sorted(layers)}" if layers else "it is a dense model"
        raise InvalidName(
            f"layer {layer!r} of {run} is not a mixture-of-experts layer ({have}): read it with "
            "activations(layer)"
        )
    return layers[layer]


def expert_path(manifest: dict[str, Any], layer: int, expert: int, tap: str, run: object) -> str:
    """``layers/L{layer:03d}/experts/E{expert:03d}/<array>``; raises ``InvalidName`` for a layer that is
    not MoE, an expert out of ``[0, n_experts)`` or a tap the run's experts do not store."""
    entry = moe_entry(manifest, layer, run)
    expert = expert_index(manifest, layer, expert, run)
    stored = list(entry.get("expert_taps") or [])
    if tap not in EXPERT_ARRAYS or tap not in stored:
        raise InvalidName(
            f"tap {tap!r} is not stored for the experts of layer {layer} of {run} (expert taps: {stored}); "
            "extract with that --tap to read it"
        )
    return expert_array_path(layer, expert, tap)


def expert_index(manifest: dict[str, Any], layer: int, expert: object, run: object) -> int:
    """``expert`` as an int in ``[0, n_experts)`` of MoE ``layer``, else ``InvalidName``."""
    n = int(moe_entry(manifest, layer, run)["n_experts"])
    if isinstance(expert, bool) or not isinstance(expert, (int, np.integer)) or not 0 <= int(expert) < n:
        raise InvalidName(
            f"expert {expert!r} is not an expert of layer {layer} of {run}: pass an int in [0, {n})"
        )
    return int(expert)


def router_paths(manifest: dict[str, Any], layer: int, run: object) -> tuple[str, str]:
    """Paths of ``(topk_ids, topk_weights)`` of MoE ``layer``; raises ``InvalidName`` if it is not MoE."""
    moe_entry(manifest, layer, run)
    return router_array_path(layer, ROUTER_IDS), router_array_path(layer, ROUTER_WEIGHTS)


def dense_refusal(manifest: dict[str, Any], layer: int, tap: str, run: object) -> str | None:
    """Why ``tap`` of ``layer`` has no dense array (an MoE layer without a shared expert), else None."""
    entry = moe_layers(manifest).get(layer)
    if entry is None or tap not in EXPERT_ARRAYS or entry.get("shared_expert"):
        return None
    return (
        f"layer {layer} of {run} is a mixture-of-experts layer without a shared expert: it has no dense "
        f"{tap!r} array, each expert has its own (expert_activations(layer, expert, tap), NaN where the "
        "expert was not routed); `qcache analyze dead` and `redundancy` analyze them per expert, other "
        "analyses do not: leave the layer out with --layers"
    )


def routed_mask(ids: np.ndarray, expert: int, done: np.ndarray | None = None) -> np.ndarray:
    """``(tokens,)`` bool: rows whose ``ids`` row ``(tokens, topk)`` holds ``expert``, and, with ``done``
    ``(tokens,)`` bool, whose unit is committed."""
    rows = (np.asarray(ids) == expert).any(axis=1)
    return rows & done if done is not None else rows


def expert_counts(ids: np.ndarray, n_experts: int, done: np.ndarray | None = None) -> np.ndarray:
    """``(n_experts,)`` int64: tokens routed to each expert, each token counted once per expert, over the
    rows where ``done`` (all rows without it); fill (-1) slots are not routes.

    Raises ``DataError`` for an id outside ``[-1, n_experts)`` (a damaged router array)."""
    ids = np.asarray(ids)
    if done is not None:
        ids = ids[done]
    if ids.size and (ids.min() < -1 or ids.max() >= n_experts):
        raise DataError(
            f"router ids outside [-1, {n_experts}) (min {int(ids.min())}, max {int(ids.max())}): the router "
            "array is damaged; re-extract the run with `qcache extract --overwrite`"
        )
    s = np.sort(ids.astype(np.int64), axis=1)
    first = np.ones(s.shape, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]  # a token listing an expert twice still saw it once
    keep = first & (s >= 0)
    return np.bincount(s[keep], minlength=n_experts).astype(np.int64)
