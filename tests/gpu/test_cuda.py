"""The CUDA path on a 4-layer model of Llama-2-7B's widths: extraction at 16/8/4 bits, IG at 16/4 bits,
the launcher's ``--gpus`` and ``qcache plan --calibrate``, each against an independent oracle.

Skipped without a CUDA device (conftest.py); scripts/gpu-check.sh runs them on a GPU node.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from tests.commands import as_process
from tests.gpu.compare import activation_errors, attribution_errors, direct_model

pytestmark = pytest.mark.requires_gpu
LIMIT = 6
CLASSES = {16: "Linear", 8: "Linear8bitLt", 4: "Linear4bit"}


def _extract(model, path, bits: int, *extra: str) -> store.Run:
    args = ["extract", "--model", str(model), "--bits", str(bits), "--limit", str(LIMIT)]
    args += ["--device", "cuda", "--quiet", "--store", str(path), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    s = store.open(path)
    (key,) = s.runs()
    return s.run(key)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_cuda_extraction_equals_a_direct_forward(tmp_path, gpu_model, bits):
    import torch

    from qcache.extract.models.loading import load_model
    from qcache.extract.models.registry import resolve_model

    # LLM.int8 picks outlier columns over the whole batch: one example per batch, as the oracle runs
    batch = "1" if bits == 8 else "16"
    run = _extract(gpu_model, tmp_path / "s", bits, "--batch-size", batch, "--layers", "1,2,4")
    m = run.manifest
    assert run.complete and m["device"] == f"cuda:{torch.cuda.get_device_name(0)}"
    assert m["n_neurons"] == 11008 and m["quant_config"]["quant"] == run.key.quant
    kinds = [
        type(x).__name__ for x in load_model(resolve_model(str(gpu_model)), run.key.quant).model.modules()
    ]
    assert kinds.count(CLASSES[bits]) >= 4 * 7  # 7 projections per decoder layer
    oracle = direct_model(gpu_model, bits, "cuda:0")
    errors = activation_errors(run, oracle)
    # a padded fp16 batch against one unpadded example: a few fp16 ulps (tests/test_smollm2.py)
    assert max(err for *_, err in errors) <= 5e-3, errors


@pytest.mark.parametrize("bits", [16, 4])
def test_cuda_attributions_equal_plain_captum(tmp_path, gpu_model, bits):
    steps = 50
    run = _extract(
        gpu_model, tmp_path / "s", bits, "--layers", "1,4", "--attributions", "--ig-steps", str(steps)
    )
    oracle = direct_model(gpu_model, bits, "cuda:0")
    errors = attribution_errors(run, oracle, steps)
    # an example unpadded in its batch: 1e-3 of the largest attribution in fp16; a padded one rounds
    # differently from Captum's unpadded run (tests/test_attribution.py allows 2e-2 for fp16 on CPU)
    assert max(err for _, _, padded, err in errors if not padded) <= 1e-3, errors
    assert max(err for *_, err in errors) <= 2e-2, errors


def test_launcher_gpus_0_fills_the_run(tmp_path, gpu_model):
    path = tmp_path / "s"
    args = ["extract", "--model", str(gpu_model), "--bits", "16", "--limit", str(LIMIT), "--gpus", "0"]
    args += ["--quiet", "--store", str(path)]
    proc = subprocess.run(
        as_process(args), capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = store.open(path)
    (key,) = s.runs()
    run = s.run(key)
    assert run.complete and run.manifest["device"].startswith("cuda:")
    # no --batch-size: the CUDA default of fp16 (docs/extract.md), created by the parent, kept by the child
    assert run.manifest["batching"]["batch_size"] == 64


def test_plan_calibrate_on_cuda_returns_a_rate(tmp_path, gpu_model):
    args = ["plan", "--model", str(gpu_model), "--bits", "16", "--limit", str(LIMIT), "--device", "cuda"]
    result = CliRunner().invoke(
        main, [*args, "--calibrate", "--format", "json", "--store", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    t = json.loads(result.output)["time"]
    assert t["rate"] > 1e12 and t["rate_from"].startswith("measured"), t  # an H100/H200 does > 1 TFLOP/s


def test_cuda_attributions_repeat_bit_identically(tmp_path, gpu_model):
    """IG sums per example in a fixed order on CUDA (ig_fast.segment_add, not index_add_'s atomics).

    SDPA's backward may still add in any order; if this fails, docs/gpu.md's determinism section is
    what to update (attributions then agree to float32 rounding, not bit for bit)."""
    import numpy as np

    runs = [
        _extract(gpu_model, tmp_path / f"s{i}", 16, "--layers", "2", "--attributions", "--ig-steps", "8")
        for i in range(2)
    ]
    a, b = (r.attributions(2).compute() for r in runs)
    np.testing.assert_array_equal(a, b)
    for layer in runs[0].manifest["layers"]:  # forwards are deterministic: same kernels, same batches
        np.testing.assert_array_equal(
            runs[0].activations(layer).compute(), runs[1].activations(layer).compute()
        )


def test_side_stream_fetch_returns_what_the_kernels_wrote():
    """extract/run/transfer.py on CUDA: the copy waits for the producing kernels (event) and its source is not
    reused before the copy ends (record_stream), even when the compute stream moves on at once."""
    import numpy as np
    import torch

    from qcache.extract.run.transfer import Fetch, real_token_index, side_stream, to_device

    dev = torch.device("cuda", 0)
    stream = side_stream(dev)
    lengths = np.array([3, 1, 4])
    idx = to_device(real_token_index(lengths, 4), dev)
    x = torch.randn(3, 4, 4096, device=dev)
    expected = x.reshape(12, -1).cpu().numpy()[real_token_index(lengths, 4)]
    for _ in range(3):
        rows = x.reshape(12, -1).index_select(0, idx) * 1.0  # (real tokens, 4096), made on the compute stream
        fetch = Fetch({"rows": rows.half()}, stream)
        del rows
        x.mul_(1.0)  # more work queued on the compute stream at once
        junk = torch.full((8, 4096), float("nan"), device=dev, dtype=torch.half)  # may reuse freed memory
        got = fetch.result()["rows"]
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, expected.astype(np.float16))
        del junk
