"""Run keys to what loading and the manifest need: the helpers the run loop calls by quant key.

Methods themselves live in the backend modules behind ``method.Method`` (registry.py lists them).
"""

from __future__ import annotations

from typing import Any

from .method import Method
from .registry import for_bits, parse_key


def quant_key(bits: int) -> str:
    """The run key of ``--bits`` (the paper's shorthand): fp32, fp16, int8 (LLM.int8) or nf4."""
    return for_bits(bits).key


def method_of(quant: str) -> Method:
    """The method a run key component names (``InvalidOption`` if none)."""
    return parse_key(quant)


def compute_dtype(quant: str) -> Any:
    """The ``torch.dtype`` of activations and unquantized parameters of a ``quant`` run."""
    return parse_key(quant).torch_dtype


def describe(quant: str) -> dict[str, Any]:
    """The manifest's ``quant_config`` (part of run identity): for fp32/fp16/int8/nf4 exactly as stored
    before the method registry (the full ``BitsAndBytesConfig`` for int8/nf4)."""
    return parse_key(quant).identity()


def activation_dtype(quant: str) -> str:
    """Dtype activations of a ``quant`` run are stored in: float32 from float32 compute (fp32) and from
    bfloat16 compute (exactly: bfloat16 does not fit float16's range), float16 from float16 compute."""
    return parse_key(quant).storage_dtype


def plan_equivalent(quant: str) -> str:
    """The paper's method whose kernels and memory profile ``qcache plan`` uses for ``quant``'s estimates:
    int8 for bitsandbytes LLM.int8 at any threshold, nf4 for bitsandbytes' 4-bit methods, else fp32 or
    fp16 by the compute dtype (others' kernels are not modelled: ``--calibrate`` measures them)."""
    from .bnb import Bnb

    method = parse_key(quant)
    if isinstance(method, Bnb):
        return "int8" if method.variant == "int8" else "nf4"
    return "fp32" if method.compute_dtype == "float32" else "fp16"
