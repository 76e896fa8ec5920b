"""Which layers a weight quantizer replaces: every decoder Linear (and GPT-2 ``Conv1D``) but those that
transformers' quantizers leave alone (the LM head and weights tied to it), the rule bitsandbytes and
torchao follow through transformers and ``qcache plan`` counts (extract/models/architecture.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from qcache.store.errors import InvalidOption


def quantized_linears(model: Any) -> Iterator[tuple[str, Any]]:
    """``(name, module)`` of every Linear/Conv1D of ``model`` a weight quantizer converts."""
    from torch import nn

    from qcache.extract.models.architecture import _converts, _not_converted

    skip = _not_converted(model)
    for name, module in model.named_modules():
        if (type(module) is nn.Linear or type(module).__name__ == "Conv1D") and _converts(name, skip):
            yield name, module


def linear_weight(module: Any) -> Any:
    """The ``(out, in)`` float32 weight of a Linear, or of a GPT-2 ``Conv1D`` (stored ``(in, out)``)."""
    w = module.weight.detach().float()
    return w.t().contiguous() if type(module).__name__ == "Conv1D" else w


def emulate_weights(model: Any, rounded: Callable[[Any], Any], *, block: int = 1, method: str = "") -> int:
    """Replace each quantized Linear's weight by ``rounded(weight)``: ``(out, in)`` float32 in and out.

    ``block``: the input width must be a multiple of it (GGUF formats quantize blocks of 32 inputs);
    otherwise ``InvalidOption`` names the layer. Returns the number of layers changed.
    """
    import torch

    done = 0
    for name, module in quantized_linears(model):
        w = linear_weight(module)
        if w.shape[1] % block:
            raise InvalidOption(
                f"{method} quantizes blocks of {block} inputs, but {name} has {w.shape[1]} inputs; "
                "pick a method without blocks (fp8-e4m3, int8) for this model"
            )
        new = rounded(w).to(module.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(new.t() if type(module).__name__ == "Conv1D" else new)
        done += 1
    return done
