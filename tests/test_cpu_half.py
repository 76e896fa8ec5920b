"""CPU half-precision matmuls widened to float32: the values of a float64 oracle rounded once, forward and
backward, and nothing else touched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from qcache.extract.quant.cpu_half import Float32HalfMatmuls, half_matmuls_in_float32


def _oracle(*arrays: torch.Tensor, op: str) -> np.ndarray:
    a = [x.double().numpy() for x in arrays]
    if op == "mm":
        return a[0] @ a[1]
    if op == "addmm":
        return a[0] + a[1] @ a[2]
    return np.matmul(a[0], a[1])


def _ulps(got: torch.Tensor, ref: np.ndarray, dtype: torch.dtype) -> float:
    """Largest error in units of the result dtype's relative spacing at the reference value (a correctly
    rounded result is within 0.5); 1e-4 absolute covers float32 accumulation where terms cancel."""
    spacing = np.abs(ref) * torch.finfo(dtype).eps + 1e-4
    return float((np.abs(got.double().numpy() - ref) / spacing).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_products_are_the_float64_product_rounded_once(dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 300, generator=g).to(dtype), torch.randn(300, 65, generator=g).to(dtype)
    bias = torch.randn(65, generator=g).to(dtype)
    x, y = torch.randn(3, 20, 50, generator=g).to(dtype), torch.randn(3, 50, 9, generator=g).to(dtype)
    with Float32HalfMatmuls() as mode:
        mm, addmm, bmm = a @ b.t().contiguous().t(), torch.addmm(bias, a, b), torch.bmm(x, y)
        mm_t = a @ b  # a transposed operand takes the same route
    assert mode.widened == 4
    for got, ref in ((mm, _oracle(a, b, op="mm")), (mm_t, _oracle(a, b, op="mm")),
                     (addmm, _oracle(bias, a, b, op="addmm")), (bmm, _oracle(x, y, op="bmm"))):  # fmt: skip
        assert got.dtype == dtype
        assert _ulps(got, ref, dtype) <= 1.0  # float32 accumulation of <= 300 terms, one rounding


def test_backward_passes_are_widened_too():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(96, 64).half()
    x = torch.randn(40, 96, generator=g).half().requires_grad_(True)
    upstream = torch.randn(40, 64, generator=g).half()
    with Float32HalfMatmuls() as mode:
        (grad,) = torch.autograd.grad(lin(x), x, upstream)
    assert mode.widened == 2  # the forward's addmm and the backward's grad @ W
    ref = upstream.double().numpy() @ lin.weight.detach().double().numpy()
    assert _ulps(grad, ref, torch.float16) <= 1.0
    (plain,) = torch.autograd.grad(lin(x), x, upstream)  # PyTorch's own CPU half GEMM, for comparison
    assert _ulps(plain, ref, torch.float16) <= 1.0


def test_float32_and_mixed_dtypes_are_left_alone():
    a = torch.randn(8, 16)
    with Float32HalfMatmuls() as mode:
        a @ a.t()
        torch.add(a.half(), 1)
    assert mode.widened == 0


@pytest.mark.parametrize(
    ("device", "dtype", "active"),
    [
        ("cpu", torch.float16, True),
        ("cpu", torch.bfloat16, True),
        ("cpu", torch.float32, False),
        ("cuda", torch.float16, False),
    ],
)
def test_the_mode_is_entered_only_for_half_models_on_a_cpu(device, dtype, active):
    with half_matmuls_in_float32(torch.device(device), dtype):
        mode = _get_current_dispatch_mode()
    assert isinstance(mode, Float32HalfMatmuls) is active


@pytest.mark.parametrize("bias", [True, False])
def test_linear_under_inference_mode_is_widened(bias):
    """Extraction forwards run under ``torch.inference_mode``, where ``linear`` and ``matmul`` reach the
    mode undecomposed; with ``undecomposed`` they take the float32 route too."""
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(300, 64, bias=bias).half()
    x = torch.randn(5, 7, 300, generator=g).half()
    y = torch.randn(300, 33, generator=g).half()
    with torch.inference_mode(), Float32HalfMatmuls() as default:
        lin(x)
    assert default.widened == 0  # the step batches' mode leaves undecomposed ops to PyTorch
    with torch.inference_mode(), Float32HalfMatmuls(undecomposed=True) as mode:
        out, prod = lin(x), torch.matmul(x, y)
    assert mode.widened == 2
    w = lin.weight.detach()
    ref = x.double().numpy() @ w.double().numpy().T
    if bias:
        ref = ref + lin.bias.detach().double().numpy()
    assert out.dtype == torch.float16 and _ulps(out, ref, torch.float16) <= 1.0
    assert _ulps(prod, x.double().numpy() @ y.double().numpy(), torch.float16) <= 1.0
