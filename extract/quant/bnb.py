"""bitsandbytes through transformers' ``BitsAndBytesConfig``: LLM.int8, NF4 and FP4 (the paper's Table 2).

LLM.int8 (Dettmers et al. 2022): int8 weights with per-row scales; input columns with any value above the
outlier threshold (default 6.0) are multiplied in float16. NF4 / FP4 (Dettmers et al. 2023, QLoRA): 4-bit
weights in blocks of 64 with an absmax scale per block, the scales themselves quantized to 8 bits with
double quantization; the 4-bit codes are NormalFloat (NF4) or a plain 4-bit float (FP4). bitsandbytes runs
all three on a CPU (0.45+), where 4-bit layers need each quantized Linear's output width to be a multiple
of 32 (a load that fails is reported as ``BackendUnavailable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .method import REAL, WEIGHT_ACTIVATION, WEIGHT_ONLY, Method, Setting, compute_dtype_setting

THRESHOLD = Setting("threshold", "--int8-threshold", "decimal", 6.0, prefix="t")
DOUBLE_QUANT = Setting("double_quant", "--double-quant/--no-double-quant", "flag", True, prefix="dq")


@dataclass(frozen=True)
class Bnb(Method):
    """``variant``: "int8" (LLM.int8), "nf4" or "fp4"."""

    variant: str = "int8"

    def _unavailable(self, device: str) -> str | None:
        reason = self.import_reason("bitsandbytes")
        if reason is not None:  # the wording tests/test_bad_input.py checks: the paper's --bits way out
            way_out = "; install it (`pip install bitsandbytes`) or use --bits 16/32"
            return reason.split("; install")[0] + way_out
        return None

    def config(self) -> Any:
        """The ``BitsAndBytesConfig``."""
        import torch
        from transformers import BitsAndBytesConfig

        s = self.settings
        if self.variant == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=s["threshold"])
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.variant,
            bnb_4bit_use_double_quant=s["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
        )

    def _load(self, device: Any) -> dict[str, Any]:
        where = str(device) if device.type == "cuda" else "cpu"
        return {"dtype": self.torch_dtype, "quantization_config": self.config(), "device_map": {"": where}}

    def _convert(self, model: Any, device: Any) -> Any:
        """Keep 4-bit layers whose input width is not a multiple of the block size off bitsandbytes' CPU
        repacking: on CPUs with AVX512-BF16 a ``Linear4bit``'s first no-grad forward repacks its weight,
        which fails for such widths ("shape '[64, 1]' is invalid for input of size 96", bitsandbytes
        0.50); left unpacked it runs bitsandbytes' plain 4-bit kernel. Other layers are left as they are."""
        for module in model.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            repacks = hasattr(module, "support_avx512bf16_for_cpu") and state is not None
            if repacks and module.in_features % state.blocksize:
                module.support_avx512bf16_for_cpu = False
        return model

    def identity(self) -> dict[str, Any]:
        """The key, compute dtype and the full ``BitsAndBytesConfig`` (as stored before the registry)."""
        import torch

        self.require("cpu")  # the config needs bitsandbytes
        full = self.config().to_dict()
        base = {"quant": self.key, "dtype": self.compute_dtype}
        return {**base, **{k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in full.items()}}


METHODS = (
    Bnb(
        "int8",
        8,
        WEIGHT_ACTIVATION,  # int8 weights and int8 rows of the input, its outlier columns in float16
        REAL,
        "bitsandbytes",
        "LLM.int8 (bitsandbytes load_in_8bit)",
        options=(THRESHOLD,),
        variant="int8",
    ),
    Bnb(
        "nf4",
        4,
        WEIGHT_ONLY,
        REAL,
        "bitsandbytes",
        "NF4 (bitsandbytes / QLoRA)",
        options=(DOUBLE_QUANT, compute_dtype_setting()),
        variant="nf4",
    ),
    Bnb(
        "fp4",
        4,
        WEIGHT_ONLY,
        REAL,
        "bitsandbytes",
        "FP4 (bitsandbytes)",
        options=(DOUBLE_QUANT, compute_dtype_setting()),
        variant="fp4",
    ),
)
