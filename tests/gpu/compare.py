"""Oracle comparisons shared by the CUDA tests and their CPU twins (test_compare_cpu.py).

Each reference is computed here, independently of qcache: a transformers (+ bitsandbytes) model loaded
directly, one example at a time and unpadded, with a plain forward hook, or a plain Captum
``LayerIntegratedGradients`` call. Tolerances are those of the CPU tests (tests/test_smollm2.py,
tests/test_attribution.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

TAP = "model.layers.{i}.mlp.act_fn"  # Llama's post-activation tap of decoder layer i (0-based)


def bnb_config(bits: int) -> Any:
    import transformers as tf

    if bits == 8:
        return tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    if bits == 4:
        return tf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16,
        )
    return None


def direct_model(path: Path, bits: int, device: str) -> Any:
    """The oracle's model: ``from_pretrained`` at ``bits`` on ``device``, nothing of qcache."""
    import transformers as tf

    kwargs: dict[str, Any] = {"dtype": torch.float32 if bits == 32 else torch.float16}
    if bits in (8, 4):
        kwargs["quantization_config"] = bnb_config(bits)
    kwargs["device_map"] = {"": device}
    return tf.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def hooked(model: Any, layer: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One unpadded example: (tap of 1-based ``layer`` as (tokens, neurons) float32, last-token probs)."""
    seen: dict[str, torch.Tensor] = {}
    module = model.get_submodule(TAP.format(i=layer - 1))
    handle = module.register_forward_hook(lambda m, a, out: seen.__setitem__("t", out))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor(np.asarray(ids), dtype=torch.long, device=device)[None]
            ).logits
    finally:
        handle.remove()
    probs = torch.softmax(logits[0, -1].float(), dim=-1)
    return seen["t"][0].float().cpu().numpy(), probs.cpu().numpy()


def activation_errors(run: Any, model: Any) -> list[tuple[int, int, float]]:
    """``(layer, example, max |got - ref| / max |ref|)`` of every stored layer and example of ``run``."""
    ids_all = run.token_index()["token_id"].to_numpy()
    out = []
    for layer in run.manifest["layers"]:
        acts = run.activations(layer).compute().astype(np.float32)
        for e in range(run.layout.n_examples):
            s0, n = int(run.layout.starts[e]), int(run.layout.lengths[e])
            ref, _ = hooked(model, layer, ids_all[s0 : s0 + n])
            out.append((layer, e, float(np.abs(acts[s0 : s0 + n] - ref).max() / np.abs(ref).max())))
    return out


def captum_attributions(model: Any, layer: int, ids: np.ndarray, steps: int) -> np.ndarray:
    """Plain Captum: log-softmax of the predicted token, zero-id baseline, Gauss-Legendre ``steps``."""
    from captum.attr import LayerIntegratedGradients

    device = next(model.parameters()).device

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=x).logits[:, -1].float(), dim=-1)

    x = torch.tensor(np.asarray(ids), dtype=torch.long, device=device)[None]
    with torch.no_grad():
        target = int(forward(x).argmax())
    lig = LayerIntegratedGradients(forward, model.get_submodule(TAP.format(i=layer - 1)))
    attr = lig.attribute(
        x, baselines=torch.zeros_like(x), target=target, n_steps=steps, method="gausslegendre"
    )
    return attr.reshape(len(ids), -1).float().detach().cpu().numpy()


def attribution_errors(run: Any, model: Any, steps: int) -> list[tuple[int, int, int, float]]:
    """``(layer, example, padded, max |got - ref| / max |ref|)`` against plain Captum, per example;
    ``padded`` is 1 when the example was shorter than another of the run (so padded in a batch)."""
    ids_all = run.token_index()["token_id"].to_numpy()
    longest = int(run.layout.lengths.max())
    out = []
    for layer in run.manifest["layers"]:
        stored = run.attributions(layer).compute()
        for e in range(run.layout.n_examples):
            s0, n = int(run.layout.starts[e]), int(run.layout.lengths[e])
            ref = captum_attributions(model, layer, ids_all[s0 : s0 + n], steps)
            err = float(np.abs(stored[s0 : s0 + n] - ref).max() / np.abs(ref).max())
            out.append((layer, e, int(n < longest), err))
    return out
