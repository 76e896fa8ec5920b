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


def moe_reason(layer: nn.Module, path: str) -> str | None:
    """Why decoder layer ``layer`` (at ``path``) cannot be tapped as one MLP, or None if it is not MoE."""
    for name, p in layer.named_parameters():
        if p.dim() == 3:
            return (
                f"{path} is a mixture-of-experts layer: its experts are fused into the 3-D weight "
                f"{path}.{name} {tuple(p.shape)} and run inside one forward with no per-expert module to "
                "hook; per-expert taps are not implemented in qcache yet"
            )
    for name, module in layer.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            first = module[0]
            if (
                any(isinstance(m, nn.Linear) for m in first.modules())
                and "Attention" not in type(first).__name__
            ):
                return (
                    f"{path} is a mixture-of-experts layer ({len(module)} experts in {path}.{name}, one "
                    "MLP each, a token routed to only some of them); per-expert taps are not implemented "
                    "in qcache yet"
                )
    return None
