"""Mixture-of-experts layers: recognised from their structure, refused with the precise reason.

A token passes through only its router's top-k experts, so a MoE layer has no single per-token MLP
activation. In transformers 5.x the experts of most MoE models are fused into 3-D weights
``(experts, out, in)`` and run inside one ``Experts.forward`` that loops over experts with plain tensor
indexing (``F.linear`` on ``weight[e]``); there is no per-expert module to hook, and tapping inside it
would mean re-implementing each model's routing loop. Per-expert arrays are therefore not implemented
yet: such layers are refused (the dense layers of the same model, e.g. DeepSeek's first layers, stay
tappable).
"""

from __future__ import annotations

from torch import nn


def _has_router(layer: nn.Module, n_experts: int, hidden: int) -> bool:
    """A 2-D weight ``(n_experts, hidden)`` in the layer: the router scoring each expert per token."""
    return any(p.dim() == 2 and tuple(p.shape) == (n_experts, hidden) for p in layer.parameters())


def moe_reason(layer: nn.Module, path: str, hidden: int) -> str | None:
    """Why decoder layer ``layer`` (at ``path``) cannot be tapped as one MLP, or None if it is not MoE.

    A layer is mixture-of-experts when it holds a router weight ``(experts, hidden)`` next to either a
    3-D expert weight ``(experts, ...)`` or a ``ModuleList`` of ``experts`` MLPs (3-D weights without a
    router, e.g. RecurrentGemma's block-diagonal gates, or convolutions, are not experts).
    """
    modules = dict(layer.named_modules())
    for name, p in layer.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        if p.dim() != 3 or isinstance(owner, nn.modules.conv._ConvNd):
            continue
        if _has_router(layer, int(p.shape[0]), hidden):
            return (
                f"{path} is a mixture-of-experts layer: its experts are fused into the 3-D weight "
                f"{path}.{name} {tuple(p.shape)} and run inside one forward with no per-expert module to "
                "hook; per-expert taps are not implemented in qcache yet"
            )
    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and _has_router(layer, len(module), hidden):
            return (
                f"{path} is a mixture-of-experts layer ({len(module)} experts in {path}.{name}, one MLP "
                "each, a token routed to only some of them); per-expert taps are not implemented in qcache "
                "yet"
            )
    return None
