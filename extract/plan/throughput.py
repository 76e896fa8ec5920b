"""Work and speed of an extraction: FLOPs of its forward passes and IG steps, and a FLOP/s rate.

FLOPs count matrix multiplies only (2 per multiply-add): every decoder Linear per padded token, attention
scores and their weighted sum (4 x seq x attn_dim per token and layer), and the LM head at each example's
last token only (the runner trims it). An IG step runs the part of the model above the tap forward and
back to the tap (input gradients only, about the forward's FLOPs again).

The rate is measured with ``calibrate_model`` (one real forward batch of the loaded model at the requested
bits on the run's device, and one IG step chunk when attributions are asked, each synchronized), or with
``calibrate`` (one Linear of the model's MLP shape, when the weights are not on this machine), or else a
stated default.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from qcache.extract.models.architecture import Architecture
from qcache.extract.quant.quantization import plan_equivalent

# Effective FLOP/s of whole extraction forwards. CPU: SmolLM2-135M end to end on a 2-core AMD EPYC
# (AVX512), the forward FLOPs of this module over wall time, load included: 1,000 Jigsaw comments (28.0
# TFLOP) in 193/220/250/177 s at fp32/fp16/int8/nf4, all BoolQ (52.7 TFLOP) in 402 s at fp32 and 362 s at
# nf4 (docs/results.md). CUDA: assumed for an A100/H100-class GPU (docs/design/codec.md's ~5k tokens/s of
# a 7B at fp16), not measured here.
DEFAULT_RATES: dict[tuple[str, str], float] = {
    ("cpu", "fp32"): 130e9,
    ("cpu", "fp16"): 120e9,
    ("cpu", "int8"): 110e9,
    ("cpu", "nf4"): 145e9,
    ("cuda", "fp32"): 15e12,
    ("cuda", "fp16"): 60e12,
    ("cuda", "int8"): 20e12,
    ("cuda", "nf4"): 40e12,
}


def forward_flops(arch: Architecture, batches: Sequence[tuple[int, int]]) -> float:
    """FLOPs of forwards of ``(rows, padded length)`` batches, LM head at the last token only; a mixture-of-
    experts layer counts the ``top_k`` experts each token is routed to (``expert_weights_per_token``)."""
    decoder = sum(x.numel for x in arch.linears if x.layer is not None) + arch.expert_weights_per_token()
    head = 2.0 * arch.hidden * arch.vocab
    total = 0.0
    for rows, seq in batches:
        per_token = 2.0 * decoder + 4.0 * seq * arch.attn_dim * arch.n_layers
        total += rows * (seq * per_token + head)
    return total


def ig_row_flops(arch: Architecture, lengths: np.ndarray, layer: int) -> np.ndarray:
    """FLOPs of one IG step row's forward above the tap of ``layer``, per example of ``lengths`` tokens
    (LM head at the last token only); its input-gradient backward costs about the same again."""
    lengths = np.asarray(lengths, dtype=np.float64)
    above = arch.tap_consumer_weights(layer) + sum(
        arch.layer_weights(j) for j in range(layer + 1, arch.n_layers + 1)
    )
    attn_layers = arch.n_layers - layer
    return (
        lengths * (2.0 * above + 4.0 * lengths * arch.attn_dim * attn_layers) + 2.0 * arch.hidden * arch.vocab
    )


def ig_flops(arch: Architecture, lengths: np.ndarray, layers: Sequence[int], steps: int) -> float:
    """FLOPs of IG's step batches: every example, every layer, ``steps`` + 1 rows (alpha = 0 too).

    Rows of a step batch are cut to their examples' longest length; counted here at each example's own.
    """
    # forward + input-gradient backward of every row
    return sum(2.0 * (steps + 1) * float(ig_row_flops(arch, lengths, layer).sum()) for layer in layers)


def default_rate(device: str, quant: str) -> tuple[float, str]:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    base = plan_equivalent(quant)
    rate = DEFAULT_RATES[(kind, base)]
    how = "default (" + ("" if base == quant else f"{base}'s rate, not measured for {quant}; ")
    if kind == "cpu":
        return rate, how + "SmolLM2 end to end on a 2-core CPU; other CPUs differ): use --calibrate"
    return rate, how + "assumed for an A100/H100-class GPU, not measured): use --calibrate on the GPU node"


def calibrate(arch: Architecture, quant: str, device: str, tokens: int, budget_s: float = 1.0) -> float:
    """FLOP/s of ``(tokens, hidden) @ (hidden, neurons)`` through a real Linear at ``quant`` on ``device``.

    bitsandbytes' ``Linear8bitLt``/``Linear4bit`` with the extraction's settings (threshold 6.0; NF4 with
    double quantization, float16 compute). Random inputs have no outlier columns, so LLM.int8's fp16
    outlier path is not timed.
    """
    import torch

    dev = torch.device(device)
    quant = plan_equivalent(quant)  # other methods' kernels are timed by the model-loading calibration
    layer = _linear(arch.hidden, arch.n_neurons, quant, dev)
    dtype = torch.float32 if quant == "fp32" else torch.float16
    x = torch.randn(max(1, tokens), arch.hidden, dtype=dtype, device=dev)  # (tokens, hidden)
    with torch.inference_mode():
        layer(x)  # warm up: kernels, CPU weight repacking
        _sync(dev)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 1000):
            t0 = time.perf_counter()
            layer(x)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        seconds = min(times)  # the fastest repeat: least disturbed by other work on the machine
    return 2.0 * x.shape[0] * arch.hidden * arch.n_neurons / seconds


def _linear(n_in: int, n_out: int, quant: str, dev: Any) -> Any:
    import torch
    from torch import nn

    if quant in ("fp32", "fp16"):
        dtype = torch.float32 if quant == "fp32" else torch.float16
        return nn.Linear(n_in, n_out, bias=False, dtype=dtype).to(dev)
    import bitsandbytes as bnb

    weight = torch.randn(n_out, n_in, dtype=torch.float16) * n_in**-0.5  # (out, in)
    layer: Any
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            n_in, n_out, bias=False, compute_dtype=torch.float16, compress_statistics=True, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
    return layer.to(dev)  # moving quantizes


def _sync(dev: Any) -> None:
    import torch

    if getattr(dev, "type", "") == "cuda":
        torch.cuda.synchronize(dev)


def calibrate_model(
    loaded: Any, arch: Architecture, rows: int, seq: int, ig: Any | None = None, budget_s: float = 1.0
) -> tuple[float, float | None]:
    """FLOP/s of ``loaded``'s forward on one ``(rows, seq)`` batch, and of one IG step chunk of ``ig``.

    The batch is random token ids (the rate does not depend on them), run as extraction runs it: the LM
    head at the last token, no autograd. The IG chunk is ``ig.steps + 1`` step rows of one ``seq``-token
    example at the middle layer, through qcache's own ``Attributor`` (its forward and input-gradient
    backward); its rate counts ``ig_flops``. The fastest of repeats within ``budget_s`` each; every
    timing ends with ``torch.cuda.synchronize``. Returns ``(forward rate, IG rate or None)``.
    """
    import torch

    from qcache.extract.arch.adapters import ModelTaps
    from qcache.extract.run.hooks import Capture, capturing

    dev = loaded.device
    taps = ModelTaps(loaded.model, probe_forward=False)  # timing only: no extra probe forward
    gen = torch.Generator().manual_seed(0)
    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(3, vocab, (max(1, rows), max(1, seq)), generator=gen).to(dev)  # (rows, seq)
    mask = torch.ones_like(ids)

    def forward() -> None:
        cap = Capture()
        cap.last_index = torch.full((ids.shape[0],), ids.shape[1] - 1, device=dev)
        with torch.inference_mode(), capturing(taps, [], cap):
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)

    f_rate = forward_flops(arch, [(ids.shape[0], ids.shape[1])]) / _fastest(forward, dev, budget_s)
    if ig is None:
        return f_rate, None
    from qcache.extract.attrib.attribution import Attributor
    from qcache.extract.run.batch_size import batch_dependent
    from qcache.extract.run.readout import label_tokens

    layer = max(1, arch.n_layers // 2)
    labels = label_tokens(loaded.tokenizer, ("yes",))
    fixed = batch_dependent(loaded.quant)  # as extraction sizes the step batches
    att = Attributor(ig, taps, [layer], loaded.tokenizer, labels, dev, batch_dependent=fixed)
    one, one_mask = ids[:1], mask[:1]
    lengths = torch.tensor([one.shape[1]], device=dev)

    def chunk() -> None:
        cap, caches = Capture(), {}
        cap.last_index = lengths - 1
        with torch.no_grad(), capturing(taps, [(layer, "act")], cap), att.recording(caches):
            logits = loaded.model(input_ids=one, attention_mask=one_mask, use_cache=False).logits[:, -1]
        att(
            ids=one,
            mask=one_mask,
            lengths=lengths,
            logits=logits,
            acts={layer: cap.tensors[(layer, "act")]},
            caches=caches,
            gold=np.zeros(1, np.int64),
            examples=[0],
        )

    work = ig_flops(arch, np.array([one.shape[1]]), [layer], ig.steps) + 2 * forward_flops(arch, [(1, seq)])
    return f_rate, work / _fastest(chunk, dev, budget_s)


def _fastest(fn: Any, dev: Any, budget_s: float) -> float:
    """Seconds of the fastest synchronized call of ``fn`` after a warm-up; at least 2 timed calls."""
    fn()  # warm-up: kernels, autotuning, CPU weight repacking
    _sync(dev)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < budget_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return min(times)
