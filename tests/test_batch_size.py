"""`--batch-size` when not given: a resumed run's own, else by device and method (run/batch_size.py).

The expectations are the documented rule (docs/extract.md, "Batch sizes") written out here: 16 on a CPU as
before device defaults, 64 on CUDA for unquantized and weight-only methods, 16 everywhere for the methods
that quantize activations (LLM.int8 picks outlier columns over the batch), 32 with ``--batching authors``.
The forward batches a run makes are read by a plain forward pre-hook on the loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from qcache.extract.quant.registry import all_methods
from qcache.extract.run.batch_size import with_batch_size
from qcache.extract.run.runner import ExtractConfig
from qcache.store import RunKey
from qcache.store.errors import InvalidOption
from tests.commands import extract_args
from tests.test_plan import plan_args

# the registry's methods that quantize activations at run time (their values may depend on the batch)
ACTIVATION_QUANTIZED = {"int8", "torchao-w8a8"}
OPTIONS = ("--layers", "2", "--chunk-rows", "160")
LIMIT = 24


def _cfg(quant: str, device: str, store: Path = Path("unused"), **kw) -> ExtractConfig:
    return ExtractConfig(model="smollm2-135m", bits=16, quant=quant, store=store, device=device, **kw)


def _expected(name: str, device: str, batching: str = "length-sorted") -> int:
    if batching == "authors":
        return 32
    if device.startswith("cuda") and name not in ACTIVATION_QUANTIZED:
        return 64
    return 16


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "meta"])
def test_the_default_follows_the_device_and_method(device):
    names = [m.name for m in all_methods()]
    assert set(names) >= ACTIVATION_QUANTIZED and {"fp16", "nf4", "fp32"} <= set(names)
    for name in names:
        assert _cfg(name, device).batches.size == _expected(name, device), name
        assert _cfg(name, device, batching="authors").batches.size == 32, name
        assert _cfg(name, device, batch_size=5).batches.size == 5, name  # a given size always wins
        assert _cfg(name, device).batch_size is None  # resolved when the run is prepared, not before


def test_auto_is_this_machines_device_and_a_bad_device_is_refused():
    import torch

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert _cfg("fp16", "auto").batches.size == _expected("fp16", auto)
    with pytest.raises(InvalidOption, match="--device 'gpu0' is not a device"):
        _ = _cfg("fp16", "gpu0").batches


def _run(store_path: Path, model: Path, *extra: str, bits: int = 32, limit: int = LIMIT):
    return CliRunner().invoke(main, extract_args(model, store_path, *OPTIONS, *extra, bits=bits, limit=limit))


@pytest.fixture
def forwards(monkeypatch):
    """Rows of each forward batch the runner makes, and how many times it loaded weights."""
    from qcache.extract.run import runner

    seen: dict[str, list[int]] = {"rows": [], "loads": []}
    load = runner.load_model

    def recording_load(*args, **kwargs):
        loaded = load(*args, **kwargs)
        seen["loads"].append(1)
        loaded.model.register_forward_pre_hook(
            lambda _m, _a, kw: seen["rows"].append(int(kw["input_ids"].shape[0])), with_kwargs=True
        )
        return loaded

    monkeypatch.setattr(runner, "load_model", recording_load)
    return seen


def test_a_resume_without_batch_size_keeps_the_stored_one(tmp_path, tiny_models, forwards):
    model, path = tiny_models["llama"], tmp_path / "s"
    first = _run(path, model, "--batch-size", "3", "--shard", "0/2")
    assert first.exit_code == 0, first.output
    forwards["rows"].clear()
    rest = _run(path, model, "--shard", "1/2")  # refused before (stored 3 vs the default 16)
    assert rest.exit_code == 0, rest.output
    assert forwards["rows"] and max(forwards["rows"]) == 3  # the stored size, not 16
    s = store.open(path)
    run = s.run(s.runs()[0])
    assert run.complete and run.manifest["batching"]["batch_size"] == 3
    # a GPU resuming it keeps it too (the CUDA default would be 64)
    key = RunKey.parse(str(s.runs()[0]))
    cfg, why = with_batch_size(_cfg("fp32", "cuda", store=path), key)
    assert (cfg.batch_size, why) == (3, "the stored run's (resumed)")
    assert with_batch_size(_cfg("fp32", "cuda", store=path, overwrite=True), key)[0].batch_size == 64
    # plan says what a resume would use, and that it resumes
    plan = CliRunner().invoke(main, [*plan_args(model, path, *OPTIONS, limit=LIMIT), "--format", "json"])
    assert plan.exit_code == 0, plan.output
    planned = json.loads(plan.stdout)
    assert planned["batching"] == {
        "mode": "length-sorted",
        "batch_size": 3,
        "from": "the stored run's (resumed)",
    }
    assert "units done" in planned["disk"]["existing"]


def test_a_given_batch_size_that_differs_is_refused_before_the_weights_load(tmp_path, tiny_models, forwards):
    model, path = tiny_models["llama"], tmp_path / "s"
    assert _run(path, model, "--batch-size", "3", "--shard", "0/2").exit_code == 0
    forwards["loads"].clear()
    refused = _run(path, model, "--batch-size", "5", "--shard", "1/2")
    assert refused.exit_code == 2, refused.output
    lines = [ln for ln in refused.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: run boolq/llama/fp32 exists with different arguments")
    assert "batch size: stored 3 vs requested 5" in lines[-1] and "Traceback" not in refused.output
    assert forwards["loads"] == []


def test_a_cpu_run_without_batch_size_records_16_as_before(tmp_path, tiny_models, forwards):
    result = _run(tmp_path / "s", tiny_models["llama"], bits=8)
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    batching = s.run(s.runs()[0]).manifest["batching"]
    assert (batching["mode"], batching["batch_size"]) == ("length-sorted", 16)
    assert max(forwards["rows"]) > 3 and max(forwards["rows"]) <= 16


def test_plan_shows_the_resolved_batch_size(tmp_path, tiny_models):
    def planned(*extra: str, bits: int = 32) -> dict:
        args = plan_args(tiny_models["llama"], tmp_path / "s", *OPTIONS, *extra, bits=bits, limit=LIMIT)
        result = CliRunner().invoke(main, [*args, "--format", "json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["batching"]

    assert planned()["batch_size"] == 16  # --device cpu
    cuda = planned("--device", "cuda")
    assert cuda == {
        "mode": "length-sorted",
        "batch_size": 64,
        "from": "the CUDA default of unquantized and weight-only methods",
    }
    assert planned("--device", "cuda", bits=8)["batch_size"] == 16
    assert planned("--device", "cuda", "--batch-size", "7")["batch_size"] == 7
    text = CliRunner().invoke(
        main, plan_args(tiny_models["llama"], tmp_path / "s", *OPTIONS, "--device", "cuda")
    )
    assert "  batches    length-sorted, --batch-size 64 (the CUDA default" in text.output


# --- IG step batches of LLM.int8: a fixed size on every device, never sized from free memory ---


def test_int8_step_batches_have_a_fixed_size_whatever_the_free_memory(tmp_path, tiny_models, monkeypatch):
    from qcache.extract.attrib import attribution
    from qcache.extract.run import runner

    monkeypatch.setattr(attribution, "auto_batch_tokens", lambda *a: 99)  # as on a GPU: memory decides
    made: list[int] = []

    class Recording(attribution.Attributor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.batch_tokens)

    monkeypatch.setattr(runner, "Attributor", Recording)
    for bits, expected in ((8, 512), (32, 99)):
        made.clear()
        options = ("--attributions", "--ig-steps", "2")
        result = _run(tmp_path / f"s{bits}", tiny_models["llama"], *options, bits=bits, limit=2)
        assert result.exit_code == 0, result.output
        assert made and set(made) == {expected}, bits
    made.clear()
    given = ("--attributions", "--ig-steps", "2", "--ig-batch-tokens", "40")
    assert _run(tmp_path / "g", tiny_models["llama"], *given, bits=8, limit=2).exit_code == 0
    assert set(made) == {40}  # a given size wins
