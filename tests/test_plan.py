"""`qcache plan` against real parts, and extraction's refusal to start on a disk too small for the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from tests.commands import extract_args
from tests.files import tree_digest

# Parameters of each alias, as its model card or paper states them (rounded there).
PUBLIC_PARAMS = {
    "llama2-7b": 6.74e9,
    "llama2-7b-chat": 6.74e9,
    "phi-2": 2.78e9,
    "opt-6.7b": 6.66e9,
    "mistral-7b": 7.25e9,
    "qwen2.5-3b": 3.09e9,
    "qwen2.5-7b": 7.62e9,
    "smollm2-135m": 0.1345e9,
}


def plan_args(
    model: str | Path, store_path: str | Path, *extra: str, bits: int = 32, limit: int = 4
) -> list[str]:
    """``qcache plan`` with the options ``tests.commands.extract_args`` gives ``qcache extract``."""
    args = extract_args(model, store_path, *extra, bits=bits, limit=limit)
    return ["plan", *(a for a in args[1:] if a != "--quiet")]


def _plan_json(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stderr may hold a loading bar (--calibrate loads the model)


def _one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    # progress bars (model loading) and warnings (truncated prompts) may precede the message
    lines = [ln for ln in result.output.splitlines() if ln.strip() and "it/s]" not in ln]
    lines = [ln for ln in lines if not ln.startswith(("warning:", "loading ", "resuming: "))]  # talk
    assert len(lines) == 1, result.output
    return lines[0]


def _stored_arrays(run_dir: Path) -> dict[str, int | None]:
    """Every zarr array of a run: path -> shape x itemsize, read from its own metadata (None for the
    variable-length ``string`` arrays, which have no item size)."""
    out: dict[str, int | None] = {}
    for meta in run_dir.rglob("zarr.json"):
        node = json.loads(meta.read_text())
        if node.get("node_type") == "array":
            path = str(meta.parent.relative_to(run_dir))
            fixed = node["data_type"] != "string"
            out[path] = int(np.prod(node["shape"])) * np.dtype(node["data_type"]).itemsize if fixed else None
    return out


# -- the model's side -------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", sorted(PUBLIC_PARAMS))
def test_every_alias_plans_offline_from_its_shipped_config(alias):
    from qcache.extract.models.architecture import describe_model, shipped_config
    from qcache.extract.models.registry import ALIASES, ModelSource

    assert set(PUBLIC_PARAMS) == set(ALIASES)
    fields = shipped_config(alias)
    arch = describe_model(ModelSource(alias, ALIASES[alias]))  # Hub id: not cached here, so shipped
    assert arch.n_params == pytest.approx(PUBLIC_PARAMS[alias], rel=0.01)
    assert arch.n_layers == fields["num_hidden_layers"]
    assert arch.n_neurons == fields.get("intermediate_size", fields.get("ffn_dim"))
    assert arch.vocab == fields["vocab_size"]


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_weight_bytes_match_a_model_loaded_through_bitsandbytes(tiny_models, family, bits):
    """Parameters + buffers == get_memory_footprint(); the quantization state == what bnb allocated."""
    from qcache.extract.models.architecture import describe_model
    from qcache.extract.models.loading import load_model
    from qcache.extract.models.registry import ModelSource
    from qcache.extract.plan.footprint import weight_bytes
    from qcache.extract.quant.quantization import quant_key

    source = ModelSource("tiny", str(tiny_models[family]))
    quant = quant_key(bits)
    model = load_model(source, quant, device="cpu").model
    planned = weight_bytes(describe_model(source), quant)
    assert planned.params + planned.buffers == model.get_memory_footprint()
    state = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "SCB", None) is not None:  # LLM.int8: float32 scale per output row
            state += weight.SCB.numel() * weight.SCB.element_size()
        qs = getattr(weight, "quant_state", None)
        if qs is not None:  # NF4 with double quantization
            parts = [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            state += sum(t.numel() * t.element_size() for t in parts)
    assert planned.quant_state == state
    assert (state > 0) == (bits in (8, 4))


def test_llama2_7b_plan_offline_has_sane_figures():
    from qcache.extract.attrib.attribution import IGConfig
    from qcache.extract.plan.estimate import plan_extract
    from qcache.extract.run.runner import ExtractConfig

    cfg = ExtractConfig(
        model="llama2-7b", bits=4, store=Path("unused"), attributions=IGConfig(), device="cuda"
    )
    p4 = plan_extract(cfg)
    assert 3.5e9 < p4.memory.weights.total < 4.0e9
    assert p4.layers == [1, 15, 32]
    shapes = {a.path: (a.shape, a.dtype) for a in p4.disk.arrays}
    n = p4.tokens.n_tokens
    assert shapes["layers/L015/activations"] == ((n, 11008), "float16")
    assert shapes["layers/L032/attributions"] == ((n, 11008), "float32")
    if not p4.tokens.exact:  # no Llama tokenizer on this machine: said so, and plausible
        assert "estimate" in p4.tokens.how and 15 < n / p4.tokens.n_examples < 40
    assert p4.memory.available is None or p4.memory.device == "cuda"
    assert "default" in p4.time.rate_from and p4.time.ig_flops > 50 * p4.time.forward_flops
    p16 = plan_extract(ExtractConfig(model="llama2-7b", bits=16, store=Path("unused"), device="cuda"))
    assert 13.4e9 < p16.memory.weights.total < 13.6e9
    assert p16.memory.weights.quant_state == 0 and p16.time.ig_flops == 0


# -- the run's side ---------------------------------------------------------------------------------


def test_planned_bytes_equal_the_arrays_a_real_extraction_writes(tmp_path, tiny_models):
    options = ("--layers", "1,3", "--tap", "act", "--tap", "down-in", "--attributions", "--ig-steps", "2")
    options += ("--chunk-rows", "64", "--batch-size", "4")
    plan = _plan_json(*plan_args(tiny_models["llama"], tmp_path / "s", *options, limit=6))
    assert plan["tokens"]["exact"] and plan["disk"]["units_pending"] == plan["disk"]["units_total"]
    result = CliRunner().invoke(main, extract_args(tiny_models["llama"], tmp_path / "s", *options, limit=6))
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    (key,) = s.runs()
    assert plan["key"] == str(key)
    stored = _stored_arrays(s.run_dir(key))
    planned = {a["path"]: a["bytes"] for a in plan["disk"]["arrays"]}
    assert planned.keys() == stored.keys()
    for path, nbytes in stored.items():
        if nbytes is None:  # token strings and prompts: an allowance at least what they take on disk
            on_disk = sum(f.stat().st_size for f in (s.run_dir(key) / path / "c").rglob("*") if f.is_file())
            assert planned[path] >= on_disk, path
        else:
            assert planned[path] == nbytes, path
    assert plan["disk"]["total"] - plan["disk"]["predictions"] == sum(planned.values())
    small = [p for p in s.files_dir(key).rglob("*") if p.suffix in (".parquet", ".done")]
    assert 0.5 < plan["disk"]["predictions"] / sum(p.stat().st_size for p in small) < 2
    again = _plan_json(*plan_args(tiny_models["llama"], tmp_path / "s", *options, limit=6))
    assert again["disk"]["units_pending"] == 0 and again["disk"]["pending"] == 0
    assert "units done" in again["disk"]["existing"]
    other = CliRunner().invoke(
        main, plan_args(tiny_models["llama"], tmp_path / "s", *options, "--layers", "2", limit=6)
    )
    assert other.output.splitlines()[-1].startswith("verdict: extract will refuse: boolq/llama/fp32 exists")
    scoring = CliRunner().invoke(  # --label-scoring is part of the run's identity: plan must not ignore it
        main,
        plan_args(tiny_models["llama"], tmp_path / "s", *options, "--label-scoring", "sequence", limit=6),
    )
    assert scoring.output.splitlines()[-1].startswith("verdict: extract will refuse: boolq/llama/fp32 exists")


def test_planned_forward_batches_are_the_ones_the_runner_makes(tmp_path, tiny_models, monkeypatch):
    from qcache.extract.plan.estimate import forward_batches
    from qcache.extract.run import runner
    from qcache.extract.run.batching import Batching

    seen: list[tuple[int, int]] = []
    load = runner.load_model

    def recording_load(*args, **kwargs):
        loaded = load(*args, **kwargs)
        loaded.model.register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        return loaded

    monkeypatch.setattr(runner, "load_model", recording_load)
    options = ("--layers", "2", "--chunk-rows", "48", "--batch-size", "3")
    result = CliRunner().invoke(main, extract_args(tiny_models["llama"], tmp_path / "s", *options, limit=13))
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    layout = s.run(s.runs()[0]).layout
    assert forward_batches(layout, Batching("length-sorted", 3)) == seen
    plan = _plan_json(*plan_args(tiny_models["llama"], tmp_path / "other", *options, limit=13))
    assert plan["time"]["padded_tokens"] == sum(r * t for r, t in seen)


def test_plan_table_names_every_array_and_ends_with_a_verdict(tmp_path, tiny_models):
    result = CliRunner().invoke(main, plan_args(tiny_models["opt"], tmp_path / "s", "--layers", "2", bits=8))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "qcache plan: boolq/opt/int8"
    for text in ("tokens/token_id", "layers/L002/activations", "exact (tokenizer", "weights (int8)"):
        assert text in result.output, text
    assert lines[-1].startswith("verdict: ok") and not (tmp_path / "s").exists()  # plan writes nothing


def test_calibration_times_a_real_forward_batch_and_ig_chunk(tmp_path, tiny_models):
    plan = _plan_json(
        *plan_args(tiny_models["llama"], tmp_path / "s", "--calibrate", "--attributions", bits=4)
    )
    t = plan["time"]
    assert t["rate_from"].startswith("measured: one ") and "nf4 model on cpu" in t["rate_from"], t
    assert t["rate"] > 0 and t["ig_rate"] > 0
    assert t["seconds"] == pytest.approx(t["forward_flops"] / t["rate"] + t["ig_flops"] / t["ig_rate"])


def test_calibration_runs_the_loaded_model_on_the_planned_shapes(tiny_models):
    from qcache.extract.attrib.attribution import IGConfig
    from qcache.extract.models.architecture import describe_model
    from qcache.extract.models.loading import load_model
    from qcache.extract.models.registry import resolve_model
    from qcache.extract.plan.throughput import calibrate_model

    source = resolve_model(str(tiny_models["llama"]))
    loaded = load_model(source, "fp32", device="cpu", for_gradients=True)
    shapes = []
    loaded.model.model.register_forward_pre_hook(
        lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)), with_kwargs=True
    )
    f_rate, ig_rate = calibrate_model(loaded, describe_model(source), 3, 7, IGConfig(steps=4), budget_s=0)
    assert f_rate > 0 and ig_rate > 0
    # warm-up + 2 timed forwards of the (3, 7) batch; then per IG chunk the example's ordinary and
    # baseline forwards and its steps + 1 = 5 step rows
    assert shapes[:3] == [(3, 7)] * 3 and set(shapes[3:]) == {(1, 7), (5, 7)}


def test_calibration_without_weights_times_one_linear(tmp_path):
    plan = _plan_json("plan", "--model", "llama2-7b", "--bits", "16", "--device", "cpu", "--limit", "4",
                      "--calibrate", "--store", str(tmp_path / "s"))  # fmt: skip
    assert plan["time"]["rate_from"].startswith("measured: fp16 Linear 4096x11008 on cpu")
    assert "no weights" in plan["time"]["rate_from"] and plan["time"]["ig_rate"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "lama2-7b"], "did you mean 'llama2-7b'"),
        (["--model", "nobody-here/no-such-model"], "no config for model nobody-here/no-such-model"),
        (["--model", "llama2-7b", "--bits", "3"], "--bits 3 is not supported"),
        (["--model", "llama2-7b", "--layers", "40"], "outside 1..32"),
    ],
)
def test_plan_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["plan", *args, "--store", str(tmp_path / "s")])
    assert message in _one_line_error(result)


# -- the disk check ---------------------------------------------------------------------------------


def _extract(model: Path, path: Path, *extra: str, limit: int):
    args = extract_args(model, path, "--layers", "1,2,3", "--chunk-rows", "64", *extra, limit=limit)
    return CliRunner().invoke(main, args)


def test_a_run_the_disk_cannot_hold_is_refused_and_the_store_untouched(tiny_models, small_disk):
    assert _extract(tiny_models["llama"], small_disk / "s", limit=4).exit_code == 0
    before = tree_digest(small_disk / "s")
    result = _extract(tiny_models["llama"], small_disk / "s", "--dataset", "toxicity", limit=400)
    line = _one_line_error(result)
    assert result.exit_code == 2
    assert "not enough disk for toxicity/llama/fp32" in line and "free at" in line
    assert "--no-disk-check" in line and "--limit" in line and "--store" in line
    assert tree_digest(small_disk / "s") == before
    assert [str(k) for k in store.open(small_disk / "s").runs()] == ["boolq/llama/fp32"]
    plan = _plan_json(
        *plan_args(
            tiny_models["llama"],
            small_disk / "s",
            "--layers",
            "1,2,3",
            "--chunk-rows",
            "64",
            "--dataset",
            "toxicity",
            limit=400,
        )
    )
    assert plan["disk_ok"] is False and plan["disk"]["pending"] > plan["disk"]["free"]


def test_no_disk_check_starts_anyway(tiny_models, small_disk):
    result = _extract(
        tiny_models["llama"], small_disk / "s", "--no-disk-check", "--dataset", "toxicity", limit=400
    )
    line = _one_line_error(result)
    assert "disk full" in line  # it started, wrote what fitted, and stopped cleanly
    (key,) = store.open(small_disk / "s").runs()
    assert store.open(small_disk / "s").run(key).done_units()


def test_resuming_a_nearly_finished_run_is_not_refused(tiny_models, small_disk):
    from qcache.store.space import free_bytes, pending_bytes
    from qcache.store.writer import ArraySpec

    assert _extract(tiny_models["llama"], small_disk / "s", limit=20).exit_code == 0
    s = store.open(small_disk / "s")
    (key,) = s.runs()
    run = s.run(key)
    last = run.layout.n_units - 1
    (run.files / "_progress" / f"u{last:07d}.done").unlink()
    arrays = [ArraySpec(f"layers/L00{n}/activations", 96, "float32") for n in (1, 2, 3)]
    whole = pending_bytes(run.layout, arrays, range(run.layout.n_units), new_run=True)
    assert whole > free_bytes(small_disk)  # counting the whole run again would refuse it
    result = _extract(tiny_models["llama"], small_disk / "s", limit=20)
    assert result.exit_code == 0, result.output
    assert store.open(small_disk / "s").run(key).complete


def test_plan_of_a_mixture_of_experts_model_counts_its_experts(tmp_path):
    """A tiny Mixtral: every router and per-expert array is planned, and its forward FLOPs equal those of
    a dense Llama of the same shapes whose MLP is as wide as the top-k experts a token goes through (plus
    the router's (experts, hidden) product): the independent oracle is the dense model's plan."""
    import transformers as tf

    from tests.arch_models import save, tiny_config

    moe_dir = save("mixtral", tmp_path / "mixtral")
    cfg = tiny_config("mixtral")
    k, width, experts = cfg.num_experts_per_tok, cfg.intermediate_size, cfg.num_local_experts
    dense = tf.LlamaConfig(**{**tiny_config("llama").to_dict(), "intermediate_size": k * width})
    dense_dir = tmp_path / "llama"
    tf.AutoModelForCausalLM.from_config(dense).save_pretrained(dense_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (moe_dir / f).exists():
            (dense_dir / f).write_bytes((moe_dir / f).read_bytes())
    opts = ("--layers", "1,2", "--tap", "act,down-in")
    moe = _plan_json(*plan_args(moe_dir, tmp_path / "s", *opts, bits=32))
    ref = _plan_json(*plan_args(dense_dir, tmp_path / "s", *opts, bits=32))
    names = {a["path"] if isinstance(a, dict) else a for a in moe["disk"]["arrays"]}
    for layer in ("L001", "L002"):
        assert {f"layers/{layer}/router/topk_ids", f"layers/{layer}/router/topk_weights"} <= names
        for e in range(experts):
            assert {
                f"layers/{layer}/experts/E{e:03d}/activations",
                f"layers/{layer}/experts/E{e:03d}/down_in",
            } <= names
        assert f"layers/{layer}/activations" not in names  # no shared expert: no dense array
    router = 2.0 * cfg.hidden_size * experts * cfg.num_hidden_layers  # per token
    assert moe["time"]["padded_tokens"] == ref["time"]["padded_tokens"]
    tokens = moe["time"]["padded_tokens"]
    assert moe["time"]["forward_flops"] == pytest.approx(
        ref["time"]["forward_flops"] + router * tokens, rel=1e-9
    )
