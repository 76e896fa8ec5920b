"""Half-precision matrix multiplies on a CPU, computed in float32.

PyTorch's CPU GEMM for float16/bfloat16 accumulates in float32 and rounds the result once, but without
AVX512-FP16 it runs at 1-8 GFLOP/s against float32's 30-60 (a 2-core AMD EPYC: 1.1 GFLOP/s for the
``grad @ W`` of a backward pass). Widening both operands to float32, multiplying, and rounding the result
back gives the same values up to the order of summation (as a GPU's float16 GEMM with float32 accumulation
does), 5-50x faster. Extraction forwards at fp16 (2.6x faster end to end on SmolLM2) and the Integrated
Gradients step batches of fp16, LLM.int8 and NF4 models (whose CPU matmuls and backward passes run in
float16) use it. bitsandbytes' own quantized matmuls do not pass through these ops and are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_HALF = (torch.float16, torch.bfloat16)
_aten = torch.ops.aten
_MATMULS = (_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default)
# Where autograd is off (torch.inference_mode, or inside an autograd Function such as bitsandbytes'
# matmuls) linear and matmul reach the mode undecomposed. Plain inference forwards widen them too; the
# Integrated Gradients steps leave them, so bitsandbytes' internal products stay PyTorch's.
_UNDECOMPOSED = (_aten.linear.default, _aten.matmul.default)


class Float32HalfMatmuls(TorchDispatchMode):
    """Runs CPU half-precision mm/addmm/bmm/baddbmm (and with ``undecomposed`` linear/matmul) in float32."""

    def __init__(self, *, undecomposed: bool = False) -> None:
        super().__init__()
        self.ops = _MATMULS + _UNDECOMPOSED if undecomposed else _MATMULS
        self.widened = 0  # multiplies taken over, for tests

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.ops:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            dtype = tensors[0].dtype
            if dtype in _HALF and all(t.dtype == dtype and t.device.type == "cpu" for t in tensors):
                self.widened += 1
                wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                return func(*wide, **kwargs).to(dtype)
        return func(*args, **kwargs)


@contextmanager
def half_matmuls_in_float32(
    device: torch.device, dtype: torch.dtype, *, undecomposed: bool = False
) -> Iterator[None]:
    """Within the block, CPU half-precision matmuls (forward and backward) run in float32;
    ``undecomposed`` also widens linear/matmul, for forwards under ``torch.inference_mode``."""
    if device.type != "cpu" or dtype not in _HALF:
        yield
        return
    with Float32HalfMatmuls(undecomposed=undecomposed):
        yield
