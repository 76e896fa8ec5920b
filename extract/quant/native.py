"""Plain floating-point models: fp32, fp16 and bf16 (no quantization; the baselines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .method import NONE, REAL, Method


@dataclass(frozen=True)
class Native(Method):
    """Every parameter cast to ``dtype_name``; PyTorch's own kernels."""

    def _load(self, device: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype}
        if device.type == "cuda":
            # weights go straight to the GPU: a 7B fp16 model never sits in host memory first (13.5 GB)
            kwargs["device_map"] = {"": str(device)}
        return kwargs

    def _convert(self, model: Any, device: Any) -> Any:
        return model if device.type == "cuda" else model.to(device)

    def identity(self) -> dict[str, Any]:
        # the manifest's quant_config as before the method registry, so stored runs keep their fingerprint
        return {"quant": self.key, "dtype": self.compute_dtype}


def native(name: str, dtype: str, peer: str) -> Native:
    bits = {"float32": 32, "float16": 16, "bfloat16": 16}[dtype]
    return Native(name, bits, NONE, REAL, "torch", peer, dtype_name=dtype)


METHODS = (
    native("fp32", "float32", "FP32 (full precision)"),
    native("fp16", "float16", "FP16 (half precision)"),
    native("bf16", "bfloat16", "BF16 (bfloat16)"),
)
