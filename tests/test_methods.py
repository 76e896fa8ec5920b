"""Quantization methods (extract/quant/): each extracts what the library's own API gives.

Every oracle here loads the tiny model with the library itself (transformers' BitsAndBytesConfig and
TorchAoConfig, hqq's ``AutoHQQHFModel.quantize_model``, the ``gguf`` package's quantize/dequantize, torch's
float8 cast with a per-row scale computed here) and reads the taps with plain hooks, one example at a time.
"""

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
from tests.models import tiny_config, tiny_tokenizer

LAYERS = (1, 3)
TAPS = ("act", "down-in", "resid")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn (OCP FP8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama whose every Linear input width is a multiple of 64 (bitsandbytes' CPU 4-bit
    repacking and GGUF's 32-wide blocks both fit)."""
    root = tmp_path_factory.mktemp("methods-llama")
    tokenizer = tiny_tokenizer()
    config = tiny_config("llama", -(-len(tokenizer) // 32) * 32)
    config.intermediate_size = 128
    torch.manual_seed(1)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)  # larger weights than the default init, so activations spread out
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _f32(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _round_linears(model, rounded, dtype):
    """Every decoder Linear's weight (the LM head left alone) replaced by ``rounded(weight)``."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(rounded(module.weight.float()))
    return model.to(dtype)


def gguf_rounded(qtype_name: str):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[qtype_name]
    return lambda w: torch.from_numpy(dequantize(quantize(w.numpy(), qtype), qtype).reshape(w.shape))


def fp8_rounded(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX  # per output row; no all-zero rows here
    return (w / scale).to(torch.float8_e4m3fn).float() * scale


def oracle_model(path, key: str):
    """``key``'s model loaded with the library's own API (not qcache's code)."""
    dtype = torch.bfloat16 if "bf16" in key else torch.float32 if key.endswith("fp32") else torch.float16
    if key.startswith("torchao") and not key.endswith("fp32"):
        dtype = torch.bfloat16  # torchao's default compute dtype here
    cpu = {"device_map": {"": "cpu"}}
    if key == "bf16":
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if key.startswith("int8"):
        cfg = tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(key.split("-t")[1]))
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=cfg, **cpu)
    if key.startswith(("nf4", "fp4")):
        cfg = tf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=key[:3],
            bnb_4bit_use_double_quant="nodq" not in key,
            bnb_4bit_compute_dtype=dtype,
        )
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=cfg, **cpu)
    if key.startswith("torchao"):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

        ao = Int8WeightOnlyConfig() if "int8wo" in key else Int8DynamicActivationInt8WeightConfig()
        cfg = tf.TorchAoConfig(quant_type=ao)
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=cfg, **cpu)
    if key.startswith("hqq"):
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        nbits, group = int(key[3]), int(key.split("-g")[1].split("-")[0])
        model = _f32(path)
        config = BaseQuantizeConfig(nbits=nbits, group_size=group)
        AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=dtype, device="cpu")
        return model
    if key.startswith("gguf"):
        return _round_linears(_f32(path), gguf_rounded(key.split("-")[1].upper()), dtype)
    assert key.startswith("fp8-e4m3"), key
    return _round_linears(_f32(path), fp8_rounded, dtype)


def _hooked(model, layer: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """act / down-in / resid of decoder layer ``layer`` (1-based) for one unpadded example."""
    where = f"model.layers.{layer - 1}"
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(f"{where}.mlp.act_fn").register_forward_hook(
            lambda m, a, out: seen.__setitem__("act", out)
        ),
        model.get_submodule(f"{where}.mlp.down_proj").register_forward_pre_hook(
            lambda m, args: seen.__setitem__("down-in", args[0])
        ),
        model.get_submodule(where).register_forward_hook(
            lambda m, a, out: seen.__setitem__("resid", out[0] if isinstance(out, tuple) else out)
        ),
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None])
    finally:
        for h in hooks:
            h.remove()
    return {t: v.float().reshape(len(ids), -1).numpy() for t, v in seen.items()}


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


# (command-line method options, the run key they must give, settings the manifest must name,
#  relative tolerance: float16/bfloat16 compute differs from the plain model by summation order, as
#  qcache widens CPU half matmuls to float32 (extract/quant/cpu_half.py))
CASES = [
    (["--quant", "bf16"], "bf16", {}, 2e-2),
    (["--quant", "fp4"], "fp4", {"double_quant": True, "compute_dtype": "float16"}, 5e-3),
    (["--bits", "8", "--int8-threshold", "4"], "int8-t4.0", {"threshold": 4.0}, 5e-3),
    (["--quant", "torchao-w8a8", "--compute-dtype", "float32"], "torchao-w8a8-fp32", {}, 1e-4),
    (["--quant", "hqq4", "--group-size", "32"], "hqq4-g32", {"group_size": 32}, 5e-3),
    (["--quant", "gguf-q4_0"], "gguf-q4_0", {"compute_dtype": "float16"}, 5e-3),
    (["--quant", "fp8-e4m3"], "fp8-e4m3", {"compute_dtype": "float16"}, 5e-3),
    *(
        pytest.param(*case, marks=pytest.mark.slow)
        for case in [
            (
                ["--quant", "nf4", "--no-double-quant", "--compute-dtype", "bfloat16"],
                "nf4-nodq-bf16",
                {"double_quant": False, "compute_dtype": "bfloat16"},
                2e-2,
            ),
            (["--quant", "torchao-int8wo"], "torchao-int8wo", {"compute_dtype": "bfloat16"}, 2e-2),
            (["--quant", "hqq3"], "hqq3-g64", {"group_size": 64}, 5e-3),
            (["--quant", "hqq2-g64-fp32"], "hqq2-g64-fp32", {"compute_dtype": "float32"}, 1e-4),
            (["--quant", "hqq8"], "hqq8-g64", {"group_size": 64}, 5e-3),
            (["--quant", "gguf-mxfp4", "--compute-dtype", "float32"], "gguf-mxfp4-fp32", {}, 1e-4),
        ]
    ),
]
IDS = [c.values[1] if hasattr(c, "marks") else c[1] for c in CASES]


@pytest.mark.parametrize(("options", "key", "settings", "tol"), CASES, ids=IDS)
def test_method_extracts_what_the_library_computes(tmp_path, llama, options, key, settings, tol):
    """Every tap of two layers equals a same-method model loaded with the library's API; the manifest
    names the method, its library and version, and its settings."""
    taps = [a for t in TAPS for a in ("--tap", t)]
    args = ("--layers", ",".join(map(str, LAYERS)), "--batch-size", "1", *taps)
    result = _cli(*extract_args(llama, tmp_path / "s", *args, limit=3, quant=options))
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    (run_key,) = s.runs()
    assert run_key.quant == key
    run = s.run(run_key)
    m = run.manifest
    described = m["quant_method"]
    assert m["quant"] == key and described["key"] == key and m["quant_config"]["quant"] == key
    assert settings.items() <= described["settings"].items()
    assert described["library_version"] and described["library"] in m["versions"]
    model = oracle_model(llama, key).eval()
    ids_all = run.token_index()["token_id"].to_numpy()
    for layer in LAYERS:
        got = {t: run.activations(layer, t).compute().astype(np.float32) for t in TAPS}
        for e in range(run.layout.n_examples):
            s0, n = int(run.layout.starts[e]), int(run.layout.lengths[e])
            ref = _hooked(model, layer, ids_all[s0 : s0 + n])
            for tap in TAPS:
                scale = np.abs(ref[tap]).max()
                assert scale > 1e-2, (key, tap)
                err = np.abs(got[tap][s0 : s0 + n] - ref[tap]).max()
                assert err <= tol * scale, (key, layer, tap, e, err / scale)


GGUF_TYPES = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "MXFP4"]


@pytest.mark.parametrize(
    "key", [f"gguf-{t.lower()}-fp32" for t in GGUF_TYPES] + ["fp8-e4m3-fp32", "fp8-e4m3"]
)
def test_emulated_weights_are_the_formats_own_rounding(llama, key):
    """Each decoder Linear's weight is the gguf package's dequantize(quantize(w)) (FP8: torch's e4m3 cast
    of w / (max|row| / 448), times the scale) of the float32 checkpoint's; the LM head is left alone."""
    from qcache.extract.models.loading import load_model
    from qcache.extract.models.registry import resolve_model

    loaded = load_model(resolve_model(str(llama)), key, device="cpu")
    original = dict(_f32(llama).named_parameters())
    rounded = fp8_rounded if key.startswith("fp8") else gguf_rounded(key.split("-")[1].upper())
    dtype = torch.float32 if key.endswith("fp32") else torch.float16
    n = 0
    for name, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = original[f"{name}.weight"].detach()
            expected = rounded(w).to(dtype)
            assert module.weight.dtype == dtype and torch.equal(module.weight, expected), name
            assert not torch.equal(expected, w.to(dtype)), name  # the format did round
            n += 1
    assert n == 3 * 7
    assert torch.equal(loaded.model.lm_head.weight, original["lm_head.weight"].detach().to(dtype))
    assert loaded.model.model.embed_tokens.weight.dtype == dtype


def test_methods_lists_every_method_and_where_it_runs():
    result = _cli("methods", "--device", "cpu", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(result.output)}
    expected = {
        "fp32", "fp16", "bf16", "int8", "nf4", "fp4", "torchao-int8wo", "torchao-int4wo-g128", "torchao-w8a8",
        "hqq2-g64", "hqq3-g64", "hqq4-g64", "hqq8-g64", "gguf-q8_0", "gguf-q5_1", "gguf-q5_0", "gguf-q4_1",
        "gguf-q4_0", "gguf-mxfp4", "fp8-e4m3",
    }  # fmt: skip
    assert set(rows) == expected
    assert rows["int8"]["bits"] == 8 and rows["int8"]["options"] == ["--int8-threshold"]
    assert rows["torchao-w8a8"]["kind"] == "weight+activation" and not rows["torchao-w8a8"]["gradients"]
    assert rows["gguf-q4_0"]["kernel"] == "emulated" and rows["hqq4-g64"]["kernel"] == "real"
    # torchao 0.18 has no CPU int4 layout: listed, unavailable, saying why in one line
    why = rows["torchao-int4wo-g128"]["unavailable"]
    assert why and "torchao" in why and "cpu" in why and "\n" not in why
    assert all(r["unavailable"] is None for k, r in rows.items() if k != "torchao-int4wo-g128"), rows
    table = _cli("methods", "--device", "cpu").output
    assert all(k in table for k in expected) and "no: torchao" in table


def _one_line_error(result, *words: str) -> str:
    assert result.exit_code != 0, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, (
        result.output
    )
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--quant", "nf4", "--bits", "4"], ["--quant", "--bits", "exclusive"]),
        (["--quant", "int8", "--group-size", "64"], ["--group-size does not apply to int8"]),
        (["--quant", "nf4", "--int8-threshold", "5"], ["--int8-threshold does not apply to nf4"]),
        (["--bits", "16", "--compute-dtype", "float32"], ["--compute-dtype does not apply to fp16"]),
        (["--quant", "int8-t4.0", "--int8-threshold", "5"], ["already sets --int8-threshold"]),
        (["--quant", "int9"], ["'int9' is unknown", "qcache methods"]),
        (["--quant", "hqq4", "--group-size", "60"], ["--group-size 60", "multiple of 8"]),
        (["--quant", "nf4-bf16-nodq"], ["spelled 'nf4-nodq-bf16'"]),
        (["--quant", "torchao-w8a8", "--compute-dtype", "float16"], ["overflows float16", "bfloat16"]),
    ],
)
def test_bad_method_options_are_one_line(tmp_path, options, words):
    args = extract_args("unused-model", tmp_path / "s", quant=options)
    _one_line_error(_cli(*args), *words)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("key", ["torchao-w8a8", "torchao-int4wo"])
def test_attributions_refused_where_there_is_no_backward(tmp_path, llama, key):
    """Refused from the options alone, before any weights load or the store is made."""
    args = extract_args(llama, tmp_path / "s", "--attributions", quant=["--quant", key])
    _one_line_error(_cli(*args), "--attributions", "not supported", "qcache methods")
    assert not (tmp_path / "s").exists()


def test_w8a8_really_has_no_backward():
    """Why W8A8 is refused: no gradient reaches the input of torchao's dynamic int8 Linear (its integer
    matmul is outside autograd; only a bias stays differentiable), so Integrated Gradients through it
    would be silently wrong. int8 weight-only differentiates as its dequantized weight does."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    for config, differentiable in (
        (Int8DynamicActivationInt8WeightConfig(), False),
        (Int8WeightOnlyConfig(), True),
    ):
        for bias in (True, False):
            layer = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=bias))
            quantize_(layer, config)
            x = torch.randn(2, 64, requires_grad=True)
            y = layer(x).sum()
            grad = torch.autograd.grad(y, x, allow_unused=True)[0] if y.requires_grad else None
            assert (grad is not None) is differentiable, (config, bias)
            if differentiable:
                expected = layer[0].weight.dequantize().float().sum(0).expand(2, -1)
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def test_torchao_int8_overflows_float16_on_a_cpu():
    """Why the torchao int8 methods refuse float16: a product that fits float16 comes out inf, because the
    unscaled int8 codes are multiplied in the output dtype; bfloat16 gets it right."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    weight = torch.rand(4, 1024)  # (out, in) positive: every product adds up
    x = torch.full((1, 1024), 30.0)
    exact = (x @ weight.T).abs().max().item()
    assert exact < 0.5 * torch.finfo(torch.float16).max  # the true output fits float16 easily
    for dtype, finite in ((torch.float16, False), (torch.bfloat16, True)):
        layer = torch.nn.Sequential(torch.nn.Linear(1024, 4, bias=False))
        layer[0].weight.data.copy_(weight)
        layer = layer.to(dtype)
        quantize_(layer, Int8WeightOnlyConfig())
        assert bool(torch.isfinite(layer(x.to(dtype))).all()) is finite, dtype


def test_int4_weight_only_is_refused_on_a_cpu(tmp_path, llama):
    args = extract_args(llama, tmp_path / "s", quant=["--quant", "torchao-int4wo"])
    _one_line_error(_cli(*args), "torchao", "cpu", "CUDA")
    assert not (tmp_path / "s").exists()


def test_a_library_that_cannot_import_is_listed_and_refused(tmp_path, llama, monkeypatch):
    """No hqq here: `qcache methods` says so per HQQ method, and extraction is refused in one line."""
    import sys

    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)  # import fails as a missing package does
    rows = {r["key"]: r for r in json.loads(_cli("methods", "--device", "cpu", "--format", "json").output)}
    assert "needs hqq, which cannot be imported here" in str(rows["hqq4-g64"]["unavailable"])
    assert rows["gguf-q4_0"]["unavailable"] is None
    _one_line_error(
        _cli(*extract_args(llama, tmp_path / "s", quant=["--quant", "hqq4"])), "needs hqq", "pip install"
    )
    assert not (tmp_path / "s").exists()


def test_the_papers_keys_and_configs_are_unchanged():
    """--bits 32/16/8/4 name fp32/fp16/int8/nf4 runs with the quant_config stored before the registry
    (part of a run's identity: a different one would stop old runs resuming and verifying)."""
    from qcache.extract.quant.quantization import describe, quant_key

    assert [quant_key(b) for b in (32, 16, 8, 4)] == ["fp32", "fp16", "int8", "nf4"]
    assert describe("fp32") == {"quant": "fp32", "dtype": "float32"}
    assert describe("fp16") == {"quant": "fp16", "dtype": "float16"}
    bnb = {
        "int8": tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
        "nf4": tf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16,
        ),
    }
    for quant, config in bnb.items():
        full = {
            k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
            for k, v in config.to_dict().items()
        }
        assert describe(quant) == {"quant": quant, "dtype": "float16", **full}


def test_4bit_layers_too_narrow_for_cpu_repacking_run(tmp_path, tiny_models):
    """bitsandbytes 0.50 fails repacking a 4-bit Linear with 96 inputs for its AVX512-BF16 CPU kernel
    ("shape '[64, 1]' is invalid for input of size 96"); such layers run its unpacked kernel instead."""
    path = tiny_models["llama"]  # intermediate size 96: down_proj has 96 inputs
    args = ("--layers", "1", "--batch-size", "1", "--tap", "act", "--tap", "down-in")
    result = _cli(*extract_args(path, tmp_path / "s", *args, limit=2, quant=["--quant", "nf4"]))
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    (key,) = s.runs()
    run = s.run(key)
    model = oracle_model(path, "nf4").eval()
    for module in model.modules():  # the 96-input layers, unpacked (bitsandbytes' blocks are 64 wide)
        if hasattr(module, "support_avx512bf16_for_cpu") and module.in_features % 64:
            module.support_avx512bf16_for_cpu = False
    ids_all = run.token_index()["token_id"].to_numpy()
    for e in range(run.layout.n_examples):
        s0, n = int(run.layout.starts[e]), int(run.layout.lengths[e])
        ref = _hooked(model, 1, ids_all[s0 : s0 + n])
        for tap in ("act", "down-in"):
            got = run.activations(1, tap).compute()[s0 : s0 + n].astype(np.float32)
            assert np.abs(got - ref[tap]).max() <= 5e-3 * np.abs(ref[tap]).max(), (tap, e)


@pytest.mark.parametrize(
    ("key", "tol"),
    [
        ("gguf-q4_0-fp32", 1e-3),
        ("torchao-int8wo-fp32", 1e-3),  # bfloat16 may change a random model's top token, the IG target
        # HQQ's solver costs ~0.5 s a layer on a loaded 2-core CPU, twice (qcache's model, the oracle's)
        *(pytest.param(k, t, marks=pytest.mark.slow) for k, t in [("hqq4-g32", 2e-2), ("fp8-e4m3", 2e-2)]),
    ],
)
def test_attributions_run_where_gradients_exist(tmp_path, llama, key, tol):
    """Integrated Gradients through the quantized layers equal Captum's on the library-loaded model."""
    from tests.test_attribution import _captum

    options = ("--layers", "3", "--batch-size", "1", "--attributions", "--ig-steps", "16")
    result = _cli(*extract_args(llama, tmp_path / "s", *options, limit=2, quant=["--quant", key]))
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    (run_key,) = s.runs()
    run = s.run(run_key)
    model = oracle_model(llama, key).eval()
    preds = run.predictions().to_pydict()
    ids_all = run.token_index()["token_id"].to_numpy()
    for layer in (3,):  # the top layer: its gradient passes through the quantized layers above the tap
        stored = run.attributions(layer).compute()
        assert stored.dtype == np.float32 and np.isfinite(stored).all()
        s0, n = int(run.layout.starts[0]), int(run.layout.lengths[0])
        ref, target, _ = _captum(model, "llama", layer, ids_all[s0 : s0 + n], steps=16, delta=False)
        assert preds["ig_target"][0] == target
        assert np.abs(ref).max() > 0
        np.testing.assert_allclose(stored[s0 : s0 + n], ref, rtol=0, atol=tol * np.abs(ref).max())


def test_torchao_import_noise_is_dropped_and_nothing_else(caplog):
    """torchao's failed loads of two extensions no method uses, and torch's Enum deprecation its import
    triggers, are dropped (they broke one-line errors); its other warnings pass."""
    import logging

    from qcache.extract.quant.quiet import silence_torchao_import

    silence_torchao_import()
    log, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load")
        log.warning("Failed to load /x/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
        pytree.warning(
            "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile"
        )
        log.warning("Failed to load /x/torchao/_C_other.so: a kernel a method needs")
        log.warning("another torchao warning")
    assert [r.getMessage()[:20] for r in caplog.records] == ["Failed to load /x/to", "another torchao warn"]


def test_launcher_children_get_the_method_options_as_given():
    """`--gpus`/`--processes` children repeat the method options, the off side of an on/off pair too."""
    from qcache.commands.extraction import _child_args, extract

    args = ["--model", "m", "--quant", "nf4", "--no-double-quant", "--compute-dtype", "bfloat16"]
    ctx = extract.make_context("extract", [*args, "--processes", "2"])
    assert _child_args(ctx) == args
