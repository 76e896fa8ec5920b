"""The CUDA path's device handling, checked on a CPU by standing in for CUDA where torch would call it.

Each test fails on the code before the fix: a torchrun rank never selected its GPU; fp16/fp32 weights were
built in host memory and then moved; every LLM.int8 input was copied on CUDA too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn

from qcache.extract.models import loading
from qcache.extract.models.registry import resolve_model


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch says a GPU is visible; ``set_device`` calls are recorded instead of run."""
    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    return calls


def test_an_indexed_cuda_device_becomes_the_current_one(fake_cuda):
    # under torchrun the rank's device is cuda:LOCAL_RANK (workers.under_torchrun); LLM.int8 and any
    # unindexed CUDA call then use it, not GPU 0
    assert loading.pick_device("cuda:3") == torch.device("cuda", 3)
    assert fake_cuda == [torch.device("cuda", 3)]
    loading.pick_device("cuda")
    assert fake_cuda == [torch.device("cuda", 3)]  # no index: whatever is current stays


@pytest.mark.parametrize("quant", ["fp16", "fp32"])
def test_full_precision_loads_straight_to_the_gpu(monkeypatch, fake_cuda, tiny_models, quant):
    seen = {}
    real = tf.AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return real(path, dtype=kwargs["dtype"])  # on the CPU: this machine has no GPU

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    moved = []
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    loaded = loading.load_model(resolve_model(str(tiny_models["llama"])), quant, device="cuda:0")
    assert seen["device_map"] == {"": "cuda:0"}  # transformers places each weight on the GPU as it loads
    assert moved == [] and loaded.device == torch.device("cuda", 0)


def test_cpu_loads_are_unchanged(monkeypatch, tiny_models):
    seen = {}
    real = tf.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        tf.AutoModelForCausalLM, "from_pretrained", lambda p, **k: seen.update(k) or real(p, **k)
    )
    loading.load_model(resolve_model(str(tiny_models["llama"])), "fp32", device="cpu")
    assert "device_map" not in seen


class Linear8bitLt(nn.Linear):  # named like bitsandbytes' layer, which is what the hook looks for
    pass


def test_int8_inputs_are_copied_on_cpu_only():
    model = nn.Sequential(Linear8bitLt(4, 4))
    assert loading.protect_int8_inputs(model) == 1
    (hook,) = model[0]._forward_pre_hooks.values()
    x = torch.ones(2, 4, requires_grad=True)
    (copy,) = hook(model[0], (x,))
    assert copy is not x and torch.equal(copy, x)  # bitsandbytes' CPU kernel zeroes outliers in place
    on_gpu = torch.ones(2, 4, device="meta", requires_grad=True)  # stands in for a CUDA tensor
    assert hook(model[0], (on_gpu,)) is None  # the CUDA kernel does not write its input: no copy
    with torch.no_grad():
        assert hook(model[0], (x,)) is None


def test_segment_add_sums_runs_of_rows_like_a_plain_loop():
    from qcache.extract.attrib.ig_fast import segment_add

    rng = np.random.default_rng(0)
    values = rng.standard_normal((7, 3, 2)).astype(np.float32)
    index = [0, 0, 0, 2, 2, 1, 1]  # a chunk's rows: example after example
    expected = np.zeros((3, 3, 2), np.float64)
    for r, i in enumerate(index):
        expected[i] += values[r]
    out = torch.zeros(3, 3, 2)
    segment_add(out, index, torch.from_numpy(values))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    again = torch.zeros(3, 3, 2)
    segment_add(again, index, torch.from_numpy(values))
    assert torch.equal(out, again)
