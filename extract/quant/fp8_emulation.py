"""FP8 e4m3 weights, per-output-channel scale, emulated: each weight rounded to float8 and back.

For every quantized Linear's float32 weight ``W`` (out, in): ``s = max|W[i, :]| / 448`` per output row
(448: the largest finite ``float8_e4m3fn``; ``s = 1`` for an all-zero row), ``W' = float(fp8(W / s)) * s``
with PyTorch's round-to-nearest-even cast to ``torch.float8_e4m3fn`` (OCP FP8 E4M3, as NVIDIA's
Hopper/Ada FP8 kernels and torchao's ``Float8WeightOnlyConfig`` store weights). ``W'`` cast to the compute
dtype replaces ``W``; activations are not quantized (weight-only), matmuls run in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .method import EMULATED, WEIGHT_ONLY, Method, compute_dtype_setting

E4M3_MAX = 448.0


@dataclass(frozen=True)
class Fp8(Method):
    def _unavailable(self, device: str) -> str | None:
        import torch

        if not hasattr(torch, "float8_e4m3fn"):
            return f"{self.key} needs torch.float8_e4m3fn (torch >= 2.1); this torch is {torch.__version__}"
        return None

    @staticmethod
    def rounded(weight: Any) -> Any:
        """The fp8 e4m3 rounding of a ``(out, in)`` float32 tensor, per-row scaled, as float32."""
        import torch

        amax = weight.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        return (weight / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale

    def _load(self, device: Any) -> dict[str, Any]:
        import torch

        where = str(device) if device.type == "cuda" else "cpu"
        return {"dtype": torch.float32, "device_map": {"": where}}

    def _convert(self, model: Any, device: Any) -> Any:
        from .targets import emulate_weights

        emulate_weights(model, self.rounded, method=self.key)
        return model.to(device=device, dtype=self.torch_dtype)


METHODS = (
    Fp8(
        "fp8-e4m3",
        8,
        WEIGHT_ONLY,
        EMULATED,
        "torch",
        "FP8 E4M3 weight-only, per-channel scale (emulation)",
        options=(compute_dtype_setting(),),
    ),
)
