"""GGUF weight formats (llama.cpp, Ollama) emulated: each weight quantized and dequantized back in numpy.

Every quantized Linear's float32 weight goes through the ``gguf`` package's own
``gguf.quants.quantize`` then ``gguf.quants.dequantize`` (blocks of 32 consecutive inputs of a row; Q8_0:
int8 codes and a float16 scale per block, Q5_0/Q4_0: 5/4-bit codes and a scale, Q5_1/Q4_1: codes, scale
and minimum, MXFP4: e2m1 codes with a shared power-of-two e8m0 scale), and the result, cast to the
compute dtype, replaces it. The model then runs PyTorch's float matmuls.

This is a **weight-only emulation**: it reproduces the rounding of the weights a GGUF file stores, not
llama.cpp's inference. llama.cpp's CPU dot products also quantize the activations (each row of the input
to Q8_0/Q8_1 blocks of 32 before its integer dot product with Q4_0/Q5_0/Q8_0... weights) and accumulate in
its own order; those activation roundings are absent here. The LM head stays at the compute dtype (llama.cpp
usually stores it as Q6_K or Q8_0), as every other method here leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .method import EMULATED, WEIGHT_ONLY, Method, compute_dtype_setting

# key suffix -> (GGMLQuantizationType name, code bits, bits per weight with the block's scales)
FORMATS = {
    "q8_0": ("Q8_0", 8, 8.5),
    "q5_1": ("Q5_1", 5, 6.0),
    "q5_0": ("Q5_0", 5, 5.5),
    "q4_1": ("Q4_1", 4, 5.0),
    "q4_0": ("Q4_0", 4, 4.5),
    "mxfp4": ("MXFP4", 4, 4.25),
}
BLOCK = 32  # inputs per block in every format above


@dataclass(frozen=True)
class Gguf(Method):
    ggml_type: str = "Q4_0"

    def _unavailable(self, device: str) -> str | None:
        reason = self.import_reason("gguf.quants")
        if reason is not None:
            return reason
        import numpy as np
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize

        try:  # an older gguf package may lack a format (MXFP4 came in 2025)
            qtype = GGMLQuantizationType[self.ggml_type]
            dequantize(quantize(np.ones((1, BLOCK), np.float32), qtype), qtype)
        except (KeyError, NotImplementedError) as exc:
            return f"the installed gguf package cannot quantize {self.ggml_type} ({exc}); upgrade gguf"
        return None

    def rounded(self, weight: Any) -> Any:
        """``dequantize(quantize(weight))`` of a ``(out, in)`` float32 tensor, as float32 on its device."""
        import torch
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize

        qtype = GGMLQuantizationType[self.ggml_type]
        values = dequantize(quantize(weight.cpu().numpy(), qtype), qtype)
        return torch.from_numpy(values.reshape(weight.shape)).to(weight.device)

    def _load(self, device: Any) -> dict[str, Any]:
        import torch

        return {"dtype": torch.float32, "device_map": {"": "cpu"}}  # rounded on the host, in numpy

    def _convert(self, model: Any, device: Any) -> Any:
        from .targets import emulate_weights

        emulate_weights(model, self.rounded, block=BLOCK, method=self.key)
        return model.to(device=device, dtype=self.torch_dtype)


def gguf(suffix: str) -> Gguf:
    name, bits, bpw = FORMATS[suffix]
    return Gguf(
        f"gguf-{suffix}",
        bits,
        WEIGHT_ONLY,
        EMULATED,
        "gguf",
        f"GGUF {name} ({bpw} bits per weight; weight-only emulation)",
        options=(compute_dtype_setting(),),
        ggml_type=name,
    )


METHODS = tuple(gguf(s) for s in FORMATS)
