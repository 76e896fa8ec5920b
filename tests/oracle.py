"""Independent references: a direct transformers forward with a plain hook, one example at a time."""

from __future__ import annotations

import numpy as np
import torch


def hooked_forward(model: torch.nn.Module, module_path: str, ids: np.ndarray, *, pre: bool = False):
    """Run ``ids`` (tokens,) alone, unpadded; return (tap tensor (tokens, neurons), last-token probs)."""
    seen: dict[str, torch.Tensor] = {}
    module = model.get_submodule(module_path)
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("t", args[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, out: seen.__setitem__("t", out))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits
    finally:
        handle.remove()
    tap = seen["t"].float()
    tap = tap.reshape(len(ids), -1)  # (tokens, neurons) whether or not the model flattened it
    return tap.numpy(), torch.softmax(logits[0, -1].float(), dim=-1).numpy()
