"""Forward hooks that capture tap points and trim the LM head to each example's last real token.

At a mixture-of-experts layer one hook on the experts module records the routing it received and the
per-expert values of the taps asked for (``extract/arch/experts.py``), in slot order: ``(tokens, k, W)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qcache.extract.arch.adapters import ModelTaps
from qcache.extract.arch.experts import expert_values, routing_inputs


class Capture:
    """Holds the tensors the hooks saw during one forward pass, keyed by (layer, tap)."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[int, str], torch.Tensor] = {}
        # MoE layers: (layer, tap) -> (tokens, k, W) values of each token's top-k experts, slot order
        self.experts: dict[tuple[int, str], torch.Tensor] = {}
        # MoE layers: layer -> (top_k_index (tokens, k), top_k_weights (tokens, k)) the experts received
        self.router: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_index: torch.Tensor | None = None  # (batch,) position of each example's last real token


@contextmanager
def capturing(taps: ModelTaps, points: list[tuple[int, str]], capture: Capture) -> Iterator[None]:
    """Register hooks on every (layer, tap) and on the LM head for the duration of the block.

    Every MoE layer among ``points`` (any tap) has its routing captured, and its expert values for the
    ``act`` / ``down-in`` taps among ``points``.
    """
    handles = []
    moe = taps.moe
    for layer in sorted({n for n, _ in points if n in moe}):
        wanted = {t for n, t in points if n == layer and t in ("act", "down-in")}
        handles.append(_experts_hook(taps, layer, wanted, capture))
    for layer, tap in points:
        point = taps.tap(layer, tap)
        if point is None:  # an MoE layer without a shared expert: its experts hook has this tap
            continue
        if point.output:  # act: the activation's output; resid: the decoder layer's output hidden state

            def on_output(_m: nn.Module, _args: Any, out: Any, key=(layer, tap)) -> None:
                # decoder layers of some architectures return (hidden, attention weights, ...)
                capture.tensors[key] = (out[0] if isinstance(out, (tuple, list)) else out).detach()

            handles.append(point.module.register_forward_hook(on_output))
        else:

            def on_input(_m: nn.Module, args: tuple[Any, ...], key=(layer, tap)) -> None:
                capture.tensors[key] = args[0].detach()

            handles.append(point.module.register_forward_pre_hook(on_input))
    try:
        with _last_token_head(taps.model, capture):
            yield
    finally:
        for h in handles:
            h.remove()


def _experts_hook(taps: ModelTaps, layer: int, wanted: set[str], capture: Capture) -> Any:
    info = taps.moe[layer]

    def on_experts(module: nn.Module, args: tuple, kwargs: dict[str, Any], _out: Any) -> None:
        hidden, ids, weights = routing_inputs(module, args, kwargs)
        capture.router[layer] = (ids.detach(), weights.detach())
        values = expert_values(
            module, info, hidden.detach(), ids.detach(), act="act" in wanted, down="down-in" in wanted
        )
        for tap, v in values.items():
            capture.experts[(layer, tap)] = v

    return taps.experts_module(layer).register_forward_hook(on_experts, with_kwargs=True)


@contextmanager
def head_at(model: nn.Module, last_index: torch.Tensor) -> Iterator[None]:
    """Feed the LM head only position ``last_index[b]`` of each row ``b`` (logits become (B, 1, V))."""
    capture = Capture()
    capture.last_index = last_index
    with _last_token_head(model, capture):
        yield


@contextmanager
def _last_token_head(model: nn.Module, capture: Capture) -> Iterator[None]:
    def last_token_only(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        # (batch, tokens, hidden) -> (batch, 1, hidden): the vocabulary projection of every padded
        # position would cost batch*tokens*vocab floats and only the last real token is read.
        hidden = args[0]
        assert capture.last_index is not None
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return (hidden[rows, capture.last_index.to(hidden.device)].unsqueeze(1), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(last_token_only)
    try:
        yield
    finally:
        handle.remove()
