"""Forward hooks that capture tap points and trim the LM head to each example's last real token."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qcache.extract.arch.adapters import ModelTaps


class Capture:
    """Holds the tensors the hooks saw during one forward pass, keyed by (layer, tap)."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[int, str], torch.Tensor] = {}
        self.last_index: torch.Tensor | None = None  # (batch,) position of each example's last real token


@contextmanager
def capturing(taps: ModelTaps, points: list[tuple[int, str]], capture: Capture) -> Iterator[None]:
    """Register hooks on every (layer, tap) and on the LM head for the duration of the block."""
    handles = []
    for layer, tap in points:
        point = taps.tap(layer, tap)
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
