"""Accelerator memory of an extraction: the weights at a bit width, one forward's working set, IG's extra.

Weights are exact for what bitsandbytes allocates: quantized Linear weights (int8: 1 byte per weight; NF4:
two weights per byte), every other parameter at the compute dtype (float32 for fp32, else float16), the
buffers, and the quantization state bitsandbytes keeps beside each weight (not a parameter, so
``get_memory_footprint()`` leaves it out): LLM.int8's float32 scale per output row; NF4's uint8 absmax per
64 weights (double quantization), its float32 absmax per 256 blocks and two small code tables.

The working sets are formulas (stated in ``WorkingSet``), not measurements.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from qcache.extract.models.architecture import Architecture, Linear
from qcache.extract.quant.quantization import method_of, plan_equivalent

NF4_BLOCK = 64  # weights per absmax (transformers' default bnb_4bit blocksize)
NESTED_BLOCK = 256  # absmax values per second-level float32 absmax (double quantization)
CUDA_OVERHEAD = 500_000_000  # CUDA context + allocator slack: a typical figure, assumed, not measured


@dataclass(frozen=True)
class WeightBytes:
    params: int  # what ``model.get_memory_footprint(return_buffers=False)`` reports
    quant_state: int  # bitsandbytes' scales and code tables
    buffers: int

    @property
    def total(self) -> int:
        return self.params + self.quant_state + self.buffers


def compute_bytes(quant: str) -> int:
    """Bytes per value of activations and unquantized parameters (4 for float32 compute, else 2)."""
    return 4 if method_of(quant).compute_dtype == "float32" else 2


def weight_bytes(arch: Architecture, quant: str) -> WeightBytes:
    """Bytes of the weights of ``arch`` loaded at ``quant`` (a method key; ``qcache methods``).

    bitsandbytes' methods exactly as described above (4-bit ones as NF4 with double quantization); torchao
    and HQQ from their storage: codes at their bits per weight (HQQ 3-bit: 10 codes per int32), one float32
    scale per row (int8) or a scale and a zero point per group at the compute dtype; the emulations hold
    their rounded weights at the compute dtype.
    """
    c = compute_bytes(quant)
    packed = _packed(quant, c)
    if packed is not None:
        quantized = [x for x in arch.linears if x.quantized]
        codes, state = packed
        rest = (arch.n_params - sum(x.numel for x in quantized)) * c
        return WeightBytes(
            rest + sum(int(-(-x.numel * codes // 1)) for x in quantized),
            sum(int(state(x)) for x in quantized),
            arch.buffer_bytes,
        )
    quant = plan_equivalent(quant)
    quantized = [x for x in arch.linears if x.quantized] if quant in ("int8", "nf4") else []
    n_quantized = sum(x.numel for x in quantized)
    rest = (arch.n_params - n_quantized) * c
    if quant == "int8":
        return WeightBytes(rest + n_quantized, sum(4 * x.n_out for x in quantized), arch.buffer_bytes)
    if quant == "nf4":
        packed = sum(-(-x.numel // 2) for x in quantized)
        return WeightBytes(rest + packed, sum(nf4_state_bytes(x.numel) for x in quantized), arch.buffer_bytes)
    return WeightBytes(rest, 0, arch.buffer_bytes)


def _packed(quant: str, c: int) -> tuple[float, Callable[[Linear], float]] | None:
    """``(bytes per code, state bytes of a Linear)`` of torchao's and HQQ's methods; None for the others."""
    from qcache.extract.quant.ao import TorchAo
    from qcache.extract.quant.halfquadratic import Hqq

    method = method_of(quant)
    if isinstance(method, TorchAo) and method.variant in ("int8wo", "w8a8"):
        return 1.0, lambda x: 4 * x.n_out
    if isinstance(method, TorchAo):  # int4: scale and zero point (bfloat16) per group
        return 0.5, lambda x: 2 * 2 * -(-x.numel // method.settings["group_size"])
    if isinstance(method, Hqq):
        per_code = {2: 0.25, 3: 0.4, 4: 0.5, 8: 1.0}[method.nbits]
        return per_code, lambda x: 2 * c * -(-x.numel // method.settings["group_size"])
    return None


def nf4_state_bytes(numel: int) -> int:
    """Quantization state of one NF4 weight with double quantization."""
    blocks = -(-numel // NF4_BLOCK)
    # absmax (uint8 per block) + nested absmax (float32 per 256 blocks) + nested code (256 float32)
    # + NF4 code (16 float32) + offset (one float32)
    return blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * 256 + 4 * 16 + 4


@dataclass(frozen=True)
class WorkingSet:
    """Memory a batch needs on top of the weights (bytes; each term documented where it is computed)."""

    rows: int  # examples per forward batch
    seq: int  # tokens per row: the longest example
    hooked: int  # captured tap tensors
    forward: int
    attribution: int
    step_tokens: int  # rows x tokens of one IG step batch (0 without attributions)
    step_tokens_from: str
    overhead: int

    @property
    def total(self) -> int:
        return self.forward + self.attribution + self.overhead


def forward_bytes(arch: Architecture, quant: str, *, rows: int, seq: int, hooked: int) -> int:
    """One forward of ``rows`` x ``seq`` tokens with ``hooked`` captured taps (no KV cache, no grads).

    Layer temporaries ~ (4 hidden + 3 MLP) values per token; attention probabilities (rows, heads, seq,
    seq) when the math kernel runs; every captured tap (rows, seq, neurons) until it is copied out; the
    last-token logits and their float32 softmax; int8's int32 accumulator of the widest Linear, or NF4's
    dequantized float16 copy of the largest weight.
    """
    c = compute_bytes(quant)
    quant = plan_equivalent(quant)
    tokens = rows * seq
    total = c * tokens * (4 * arch.hidden + 3 * arch.n_neurons) + c * rows * arch.heads * seq * seq
    total += hooked * c * tokens * arch.n_neurons + rows * arch.vocab * (c + 4)
    quantized = [x for x in arch.linears if x.quantized]
    if quant == "int8" and quantized:
        total += 4 * tokens * max(x.n_out for x in quantized)
    if quant == "nf4" and quantized:
        total += 2 * max(x.numel for x in quantized)
    return total


def ig_bytes_per_token(arch: Architecture, quant: str) -> int:
    """Autograd graph per step-batch token: the budget ``attribution.auto_batch_tokens`` divides by."""
    return arch.n_layers * (14 * arch.hidden + 6 * arch.n_neurons) * compute_bytes(quant)


def ig_step_tokens(
    arch: Architecture, quant: str, device: str, given: int | None, seq: int
) -> tuple[int, str]:
    """Rows x tokens of one IG step batch, as ``attribution.auto_batch_tokens`` will pick it."""
    if given is not None:
        return max(given, seq), "--ig-batch-tokens"
    from qcache.extract.attrib.attribution import FIXED_STEP_TOKENS
    from qcache.extract.run.batch_size import batch_dependent

    if batch_dependent(quant):
        return max(FIXED_STEP_TOKENS, seq), "fixed on every device: the method's values depend on the batch"
    per_token = ig_bytes_per_token(arch, quant)
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return max(
                int(min(max(free // 3 // per_token, 256), 1 << 17)), seq
            ), "auto: 1/3 of free GPU memory"
        return max(256, seq), "auto: at least this, up to 1/3 of the GPU's free memory"
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        free = 8 << 30
    return max(int(min(max(free // 4 // per_token, 64), 512)), seq), "auto on CPU, at most 512"


def attribution_bytes(
    arch: Architecture, quant: str, *, rows: int, seq: int, layers: int, step_tokens: int
) -> int:
    """IG's extra: per attributed layer its replay cache (layer input, attention output, up projection),
    the baseline's tap (rows, seq, neurons) and the float32 gradient sum; plus one step batch's graph."""
    c = compute_bytes(quant)
    gated = arch.family in ("llama", "mistral", "qwen2", "qwen3")
    per_layer = (
        rows * seq * (c * (2 * arch.hidden + (2 if gated else 1) * arch.n_neurons) + 4 * arch.n_neurons)
    )
    return layers * per_layer + step_tokens * ig_bytes_per_token(arch, quant)


def working_set(
    arch: Architecture,
    quant: str,
    device: str,
    *,
    rows: int,
    seq: int,
    hooked: int,
    ig_layers: int = 0,
    ig_batch_tokens: int | None = None,
) -> WorkingSet:
    """Everything but the weights for batches of ``rows`` x ``seq`` tokens on ``device``."""
    forward = forward_bytes(arch, quant, rows=rows, seq=seq, hooked=hooked)
    step, step_from, ig = 0, "", 0
    if ig_layers:
        step, step_from = ig_step_tokens(arch, quant, device, ig_batch_tokens, seq)
        ig = attribution_bytes(arch, quant, rows=rows, seq=seq, layers=ig_layers, step_tokens=step)
    overhead = CUDA_OVERHEAD if device.startswith("cuda") else 0
    return WorkingSet(rows, seq, hooked, forward, ig, step, step_from, overhead)
