"""The arrays, manifest entry and per-unit blocks of a run's mixture-of-experts layers (docs/store.md).

Store contract, for MoE layer ``L`` (1-based) with ``E`` experts of ``W`` neurons and ``k`` experts per token:

* ``layers/L{L:03d}/experts/E{e:03d}/activations`` and ``.../down_in``: ``(token, neuron)``, the dense taps'
  float dtype: expert ``e``'s ``act`` / ``down-in`` values on the tokens routed to it, NaN in other rows;
* ``layers/L{L:03d}/router/topk_ids``: ``(token, topk)`` int16, fill -1: the experts each token went to,
  in the router's slot order;
* ``layers/L{L:03d}/router/topk_weights``: ``(token, topk)`` float32, fill NaN: the weight the experts
  forward multiplies each chosen expert's output by;
* ``manifest["moe"][str(L)]``: n_experts, top_k, expert_neurons, shared_expert, experts_module,
  router_module, experts_quantized, expert_taps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qcache.extract.arch.adapters import ModelTaps
from qcache.extract.arch.moe import LayerExperts
from qcache.store import ArraySpec, TokenLayout
from qcache.store.keys import ROUTER_IDS, ROUTER_WEIGHTS
from qcache.store.keys import expert_array_path as expert_path
from qcache.store.keys import router_array_path as router_path

EXPERT_TAPS = ("act", "down-in")


def moe_arrays(
    moe: dict[int, LayerExperts], layers: list[int], taps: tuple[str, ...], dtype: str
) -> tuple[ArraySpec, ...]:
    """The router arrays of every MoE layer among ``layers``, and its experts' arrays for ``taps``."""
    out: list[ArraySpec] = []
    for n in layers:
        if n not in moe:
            continue
        info = moe[n]
        out += [ArraySpec(router_path(n, ROUTER_IDS), info.top_k, "int16")]
        out += [ArraySpec(router_path(n, ROUTER_WEIGHTS), info.top_k, "float32")]
        for t in taps:
            if t in EXPERT_TAPS:
                out += [ArraySpec(expert_path(n, e, t), info.width, dtype) for e in range(info.n_experts)]
    return tuple(out)


def experts_quantized(taps: ModelTaps, layer: int) -> bool:
    """Whether the expert weights of MoE ``layer`` are stored quantized.

    Every method of extract/quant quantizes Linear layers only (transformers' ``replace_with_*_linear`` for
    bitsandbytes, torchao and HQQ; ``targets.quantized_linears`` for the emulations), so a fused 3-D expert
    weight is quantized only if it is no longer a plain floating-point tensor (a quantized tensor subclass
    or an integer dtype).
    """
    module = taps.experts_module(layer)
    for p in module.parameters(recurse=False):
        if p.dim() == 3 and (type(p.data) is not torch.Tensor or not p.dtype.is_floating_point):
            return True
    return False


def manifest_entries(taps: ModelTaps, layers: list[int], run_taps: tuple[str, ...]) -> dict[str, Any]:
    """``manifest["moe"]``: one entry per MoE layer among ``layers``, keyed by its 1-based number."""
    out = {}
    for n in layers:
        info = taps.moe.get(n)
        if info is None:
            continue
        path = taps.structure.layers[n - 1].path
        out[str(n)] = {
            "n_experts": info.n_experts,
            "top_k": info.top_k,
            "expert_neurons": info.width,
            "shared_expert": taps.structure.layers[n - 1].mlp is not None,
            "experts_module": f"{path}.{info.module}",
            "router_module": f"{path}.{info.router}" if info.router else path,
            "experts_quantized": experts_quantized(taps, n),
            "expert_taps": [t for t in run_taps if t in EXPERT_TAPS],
        }
    return out


def empty_blocks(
    moe: dict[int, LayerExperts], layers: list[int], taps: tuple[str, ...], rows: int, dtype: np.dtype
) -> dict[str, np.ndarray]:
    """A unit's MoE blocks at their fill values (rows not routed to an expert stay so)."""
    blocks = {}
    for spec in moe_arrays(moe, layers, taps, np.dtype(dtype).name):
        fill = -1 if spec.dtype == "int16" else np.nan
        blocks[spec.path] = np.full((rows, spec.n_neurons), fill, dtype=spec.dtype)
    return blocks


def device_rows(
    capture: Any, layers: list[int], real: torch.Tensor, out_dtype: torch.dtype, n_rows: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The batch's real-token rows of the captured routing and expert values, and their non-finite count.

    ``real``: the rows of the ``(batch * seq)`` flattening that hold real tokens; the experts must have
    seen ``n_rows = batch * seq`` tokens in that order (``RuntimeError`` otherwise: rows would be misplaced).

    Keys: ``moe/L/ids`` ``(rows, k)`` int16, ``moe/L/weights`` ``(rows, k)`` float32, ``moe/L/<tap>``
    ``(rows, k, W)`` in ``out_dtype`` (slot order, scattered to the experts' arrays on the host).
    """
    out: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), dtype=torch.int64, device=real.device)
    for n in layers:
        if n not in capture.router:
            continue
        ids, weights = capture.router[n]
        if ids.shape[0] != n_rows:
            raise RuntimeError(
                f"the experts of layer {n} saw {ids.shape[0]} tokens, not batch x seq = {n_rows}"
            )
        out[f"moe/{n}/ids"] = ids.index_select(0, real).to(torch.int16)
        out[f"moe/{n}/weights"] = weights.index_select(0, real).to(torch.float32)
        for t in EXPERT_TAPS:
            v = capture.experts.get((n, t))
            if v is not None:
                v = v.index_select(0, real)
                bad += (~torch.isfinite(v)).sum()
                out[f"moe/{n}/{t}"] = v.to(out_dtype)
    return out, bad


def scatter(
    blocks: dict[str, np.ndarray],
    arrays: dict[str, np.ndarray],
    batch: np.ndarray,
    lengths: np.ndarray,
    layout: TokenLayout,
    r0: int,
    r1: int,
) -> None:
    """Write a batch's ``moe/...`` rows (``device_rows``, on the host) into the unit's blocks ``[r0, r1)``.

    Rows are the batch's real tokens example after example; expert ``e``'s array gets the rows whose
    ``ids`` name ``e``, from the slot that names it.
    """
    unit_row = np.concatenate(
        [int(layout.starts[e]) + np.arange(int(n)) - r0 for e, n in zip(batch, lengths, strict=True)]
    )  # (rows,) row of the unit each batch row goes to
    inside = (unit_row >= 0) & (unit_row < r1 - r0)
    layers = sorted({int(k.split("/")[1]) for k in arrays if k.startswith("moe/")})
    for n in layers:
        ids = arrays[f"moe/{n}/ids"]  # (rows, k)
        blocks[router_path(n, ROUTER_IDS)][unit_row[inside]] = ids[inside]
        blocks[router_path(n, ROUTER_WEIGHTS)][unit_row[inside]] = arrays[f"moe/{n}/weights"][inside]
        for t in EXPERT_TAPS:
            values = arrays.get(f"moe/{n}/{t}")  # (rows, k, W)
            if values is None:
                continue
            for e in np.unique(ids[inside]).tolist():
                if e < 0 or expert_path(n, e, t) not in blocks:
                    continue
                row, slot = np.nonzero((ids == e) & inside[:, None])
                blocks[expert_path(n, e, t)][unit_row[row]] = values[row, slot]
