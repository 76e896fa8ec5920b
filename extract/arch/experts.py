"""Per-expert values of a fused experts module, recomputed from its own weights and routing inputs.

The module is transformers' ``use_experts_implementation`` layout (``moe.py``): ``gate_up_proj`` (or
``up_proj`` when not gated) and ``down_proj`` of shape ``(experts, out, in)`` (``(experts, in, out)`` when
``is_transposed``), optional ``*_bias`` ``(experts, out)``, an ``act_fn`` module or an own ``_apply_gate``.
Its eager forward (``MixtralExperts.forward``) loops over the experts hit, in increasing id, taking the
tokens routed to expert ``e`` as ``torch.where(one_hot(top_k_index)[..., e].T)`` (slot-major order), then
``act_fn(gate) * up`` of ``x W[e]^T``. ``expert_values`` repeats exactly those ops on exactly those rows, so
under the eager implementation (``ModelTaps`` forces it) the values are the model's own, bit for bit.

``reconstruct`` adds the experts' outputs back up from the recomputed down-projection inputs, the down
weights and the routing weights; the probe requires it to equal the module's own output.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .moe import ROUTING_ARGS, LayerExperts


def routing_inputs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """``(hidden (tokens, hidden), top_k_index (tokens, k), top_k_weights (tokens, k))`` of one call of the
    experts ``module``, whatever names its forward gives them (gpt-oss: ``router_indices``, ...)."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    names = list(inspect.signature(type(module).forward).parameters)[1 : 1 + ROUTING_ARGS]
    return tuple(bound.arguments[n] for n in names)


def _project(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    # the two spellings of transformers' eager loops: F.linear on (out, in), ``x @ W`` on (in, out)
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def expert_values(
    module: nn.Module,
    info: LayerExperts,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    *,
    act: bool,
    down: bool,
) -> dict[str, torch.Tensor]:
    """Each token's values at each of its top-k experts: ``{"act": (tokens, k, W), "down-in": ...}``.

    ``[t, j]`` holds expert ``top_k_index[t, j]``'s value for token ``t``, in ``hidden``'s dtype; slots
    naming no expert (an expert-parallel sentinel ``>= n_experts``) stay NaN. ``act``: ``act_fn(gate x)``
    (gated) or ``act_fn(up x)``; ``down-in``: the down projection's input, ``act_fn(gate x) * up x`` or the
    module's own ``_apply_gate(gate_up x)``.
    """
    tokens, k = top_k_index.shape
    out = {
        name: hidden.new_full((tokens, k, info.width), float("nan"))
        for name, wanted in (("act", act), ("down-in", down))
        if wanted
    }
    if not out:
        return out
    n = info.n_experts
    with torch.no_grad():  # the eager loop's own bookkeeping: experts hit, and their tokens slot-major
        mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)  # (n + 1, k, tokens)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    up_w = module.gate_up_proj if info.gated else module.up_proj
    up_b = (module.gate_up_proj_bias if info.gated else module.up_proj_bias) if info.has_bias else None
    for e in hit[:, 0].tolist():
        if e >= n:
            continue
        slot, token = torch.where(mask[e])
        proj = _project(hidden[token], up_w[e], None if up_b is None else up_b[e], info.transposed)
        if info.custom_gate:
            values = {"down-in": module._apply_gate(proj)}
        elif info.gated:
            gate, up = proj.chunk(2, dim=-1)
            a = module.act_fn(gate)
            values = {"act": a, "down-in": a * up}
        else:
            a = module.act_fn(proj)
            values = {"act": a, "down-in": a}
        for name, dest in out.items():
            dest[token, slot] = values[name].to(dest.dtype)
    return out


def reconstruct(
    module: nn.Module,
    info: LayerExperts,
    down_in: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts' output ``(tokens, hidden)`` in float32 rebuilt from ``down_in`` ``(tokens, k, W)``:
    ``sum_j w[t, j] * down_e(down_in[t, j])`` with ``e = top_k_index[t, j]`` (plus the down bias and the
    post-expert norm where the module has them)."""
    bias = module.down_proj_bias if info.has_bias else None
    norm = (
        getattr(module, "post_expert_norm", None) if getattr(module, "has_post_expert_norm", False) else None
    )
    total: torch.Tensor | None = None
    for j in range(top_k_index.shape[1]):
        ids = top_k_index[:, j]
        for e in torch.unique(ids).tolist():
            if e >= info.n_experts:
                continue
            rows = torch.nonzero(ids == e)[:, 0]
            y = _project(
                down_in[rows, j], module.down_proj[e], None if bias is None else bias[e], info.transposed
            )
            if norm is not None:
                y = norm(y)
            y = y.float() * top_k_weights[rows, j, None].float()
            if total is None:
                total = torch.zeros((down_in.shape[0], y.shape[-1]), dtype=torch.float32, device=y.device)
            total.index_add_(0, rows, y)
    assert total is not None, "no token was routed to any expert"
    return total
