"""Mixture-of-experts layers: found from their structure, tapped per expert, or refused with the reason.

A token passes through only its router's top-k experts. In transformers 5.x the experts of most MoE models
are fused into 3-D weights ``(experts, out, in)`` and run inside one ``Experts.forward(hidden_states,
top_k_index, top_k_weights)`` (``transformers.integrations.moe.use_experts_implementation``): there is no
per-expert module to hook. qcache therefore hooks the experts module itself: its inputs are the routing
straight from the model (which experts each token went to, and the weight each expert's output is
multiplied by), and each expert's activation ``act(gate x)`` and down-projection input ``act(gate x) *
up x`` are recomputed from the module's own weights with the ops of its eager forward (``experts.py``),
then confirmed on the probe forward (the per-expert values, the down weights and the routing weights must
give the module's own output back).

Layers whose experts do not follow that layout (no routing arguments, weights under other names, a ModuleList
of expert MLPs) keep a precise refusal; the dense layers of the same model stay tappable.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

ROUTING_ARGS = 3  # hidden_states (tokens, hidden), top_k_index (tokens, k), top_k_weights (tokens, k)


@dataclass
class LayerExperts:
    """The routed experts of one MoE decoder layer; paths are relative to the layer module.

    ``act_reason`` / ``down_reason`` say why the ``act`` / ``down-in`` expert tap is refused (None: offered).
    ``gated``: ``act(gate x) * up x`` (``gate_up_proj``); else ``act(up x)`` (``up_proj``, no gate).
    ``custom_gate``: the class overrides ``_apply_gate`` (clamps, biased GLUs): the down-projection input is
    that function's output and there is no separate activation output.
    """

    module: str  # e.g. "mlp.experts"
    router: str  # the module holding the router weight (experts, hidden), e.g. "mlp.gate"
    n_experts: int
    top_k: int
    width: int  # neurons of one expert: the down projection's input width
    gated: bool
    custom_gate: bool
    transposed: bool  # weights stored (experts, in, out) and applied as x @ W[e]
    has_bias: bool
    act_reason: str | None = None
    down_reason: str | None = None
    confirmed: bool = False  # the probe reproduced the module's output from the recomputed values


def _router(layer: nn.Module, n_experts: int, hidden: int) -> str | None:
    """Path of the module owning a 2-D ``(n_experts, hidden)`` weight: the router scoring each expert."""
    for name, p in layer.named_parameters():
        if p.dim() == 2 and tuple(p.shape) == (n_experts, hidden):
            return name.rpartition(".")[0]
    return None


def _top_k(config: object, layer: nn.Module, router: str) -> int | None:
    """Experts per token: the router's or MoE block's ``top_k``, else the config's."""
    owners = [layer.get_submodule(router)] if router else []
    parent = router.rpartition(".")[0]
    owners.append(layer.get_submodule(parent) if parent else layer)
    for owner in owners:
        for attr in ("top_k", "num_experts_per_tok"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    for attr in ("num_experts_per_tok", "moe_topk", "moe_top_k", "num_experts_per_token", "top_k"):
        value = getattr(config, attr, None)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_experts(
    layer: nn.Module, path: str, hidden: int, config: object
) -> tuple[LayerExperts | None, str | None]:
    """``(experts, None)`` for a tappable MoE layer, ``(None, reason)`` for a refused one, ``(None, None)``
    when ``layer`` (at ``path``) is not mixture-of-experts.

    A layer is mixture-of-experts when it holds a router weight ``(experts, hidden)`` next to either a 3-D
    expert weight ``(experts, ...)`` or a ``ModuleList`` of ``experts`` MLPs (3-D weights without a router,
    e.g. RecurrentGemma's block-diagonal gates, or convolutions, are not experts).
    """
    modules = dict(layer.named_modules())
    for name, p in layer.named_parameters():
        owner_name = name.rpartition(".")[0]
        owner = modules[owner_name]
        if p.dim() != 3 or isinstance(owner, nn.modules.conv._ConvNd):
            continue
        router = _router(layer, int(p.shape[0]), hidden)
        if router is None:
            continue
        where = f"{path}.{owner_name}"
        reason = _fused_reason(owner, where)
        if reason is not None:
            return None, f"{path} is a mixture-of-experts layer whose experts {reason}"
        top_k = _top_k(config, layer, router)
        if top_k is None:
            return None, (
                f"{path} is a mixture-of-experts layer whose number of experts per token (top_k) is "
                "neither on its router nor in its config"
            )
        return _describe(owner, owner_name, router, top_k, where), None
    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and _router(layer, len(module), hidden):
            return None, (
                f"{path} is a mixture-of-experts layer ({len(module)} experts in {path}.{name}, one MLP "
                "module each); per-expert taps are implemented for fused 3-D expert weights only"
            )
    return None, None


def _fused_reason(experts: nn.Module, where: str) -> str | None:
    """Why the fused experts module ``experts`` cannot be tapped, or None."""
    cls = type(experts).__name__
    params = inspect.signature(type(experts).forward).parameters
    if len(params) < 1 + ROUTING_ARGS:
        return (
            f"({where}, {cls}) are called as forward{tuple(list(params)[1:])}, not with the routing "
            "(hidden_states, top_k_index, top_k_weights) qcache reads each token's experts from"
        )
    if not hasattr(experts, "has_gate") or not hasattr(experts, "is_transposed"):
        return (
            f"({where}, {cls}) are not built with transformers' use_experts_implementation layout "
            "(gate_up_proj/up_proj and down_proj, has_gate, is_transposed); per-expert taps are implemented "
            "for that layout only"
        )
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    for weight in (up, "down_proj"):
        p = getattr(experts, weight, None)
        if not isinstance(p, nn.Parameter) or p.dim() != 3:
            return f"({where}, {cls}) have no 3-D weight {weight!r}"
    if not hasattr(experts, "act_fn") and not _custom_gate(experts):
        return f"({where}, {cls}) have no act_fn module and no gating function of their own"
    return None


def _custom_gate(experts: nn.Module) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(type(experts), "_apply_gate", _default_apply_gate)
    return bool(getattr(experts, "has_gate", False)) and gate is not _default_apply_gate


def _describe(experts: nn.Module, rel: str, router: str, top_k: int, where: str) -> LayerExperts:
    transposed = bool(experts.is_transposed)
    down = experts.down_proj  # (E, hidden, W), or (E, W, hidden) transposed
    width = int(down.shape[1] if transposed else down.shape[2])
    cls = type(experts).__name__
    info = LayerExperts(
        module=rel,
        router=router,
        n_experts=int(down.shape[0]),
        top_k=top_k,
        width=width,
        gated=bool(experts.has_gate),
        custom_gate=_custom_gate(experts),
        transposed=transposed,
        has_bias=bool(getattr(experts, "has_bias", False)),
    )
    if info.custom_gate:
        info.act_reason = (
            f"the experts of {where} ({cls}) apply their own gating function ({cls}._apply_gate: "
            "clamps or a biased GLU), which has no separate activation output"
        )
    if not info.gated:
        info.down_reason = (
            f"the experts of {where} ({cls}) are not gated (act(up x), no gate_up_proj): their "
            "down projection reads the activation output itself"
        )
    return info
