"""Half-precision matrix multiplies on a CPU, computed in float32.

PyTorch's CPU GEMM for float16/bfloat16 accumulates in float32 and rounds the result once, but without
AVX512-FP16 it runs at 1-8 GFLOP/s against float32's 30-60 (a 2-core AMD EPYC: 1.1 GFLOP/s for the
``grad @ W`` of a backward pass). Widening both operands to float32, multiplying, and rounding the result
back gives the same values up to the order of summation (as a GPU's float16 GEMM with float32 accumulation
does), 5-50x faster. Integrated Gradients on fp16, LLM.int8 and NF4 models (whose CPU matmuls and
backward passes run in float16) use it for their step batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_HALF = (torch.float16, torch.bfloat16)
_aten = torch.ops.aten
# linear and matmul reach the mode undecomposed under torch.inference_mode (no autograd key to split them)
_MATMULS = (
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten.linear.default,
    _aten.matmul.default,
)


class Float32HalfMatmuls(TorchDispatchMode):
    """Runs CPU half-precision matmuls (mm, addmm, bmm, baddbmm, linear, matmul) in float32, rounded once."""

    def __init__(self) -> None:
        super().__init__()
        self.widened = 0  # multiplies taken over, for tests

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            dtype = tensors[0].dtype
            if dtype in _HALF and all(t.dtype == dtype and t.device.type == "cpu" for t in tensors):
                self.widened += 1
                wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                return func(*wide, **kwargs).to(dtype)
        return func(*args, **kwargs)


@contextmanager
def half_matmuls_in_float32(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, CPU half-precision matmuls (forward and backward) run in float32."""
    if device.type != "cpu" or dtype not in _HALF:
        yield
        return
    with Float32HalfMatmuls():
        yield
