"""Bit widths to transformers/bitsandbytes loading arguments, as in the paper's Table 2."""

from __future__ import annotations

from typing import Any

import torch

from qcache.store.errors import BackendUnavailable, InvalidOption
from qcache.store.keys import BITS_TO_QUANT


def quant_key(bits: int) -> str:
    if bits not in BITS_TO_QUANT:
        raise InvalidOption(f"--bits {bits} is not supported: use 32, 16, 8 (LLM.int8) or 4 (NF4)")
    return BITS_TO_QUANT[bits]


def compute_dtype(quant: str) -> torch.dtype:
    return torch.float32 if quant == "fp32" else torch.float16


def bnb_config(quant: str) -> Any | None:
    """``BitsAndBytesConfig`` for int8/nf4, ``None`` for plain fp32/fp16."""
    if quant in ("fp32", "fp16"):
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise BackendUnavailable(
            f"{quant} needs bitsandbytes, which cannot be imported here ({exc}); "
            "install it (`pip install bitsandbytes`) or use --bits 16/32"
        ) from exc
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    )


def describe(quant: str) -> dict[str, Any]:
    """The full quantization config as recorded in the manifest."""
    cfg = bnb_config(quant)
    base: dict[str, Any] = {
        "quant": quant,
        "dtype": str(compute_dtype(quant)).removeprefix("torch."),
    }
    if cfg is None:
        return base
    full = cfg.to_dict()
    return {**base, **{k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in full.items()}}
