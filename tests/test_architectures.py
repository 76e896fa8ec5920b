"""Every decoder-only ``*ForCausalLM`` type of the installed transformers: extract and compare, or refuse.

For each type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (so a type transformers adds is tested too) a tiny
random model is built from its config class (``tests/arch_models.py``), extracted by ``qcache extract``
at 32 bits with every tap it offers, and compared with a plain hooked transformers forward at the module
paths written below by hand from each architecture's modeling code (not from qcache's discovery).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from tests.arch_models import SKIP, build, causal_lm_types, tiny_config, tiny_tokenizer
from tests.commands import extract_args

_L = "model.layers"
_LLAMA = (_L, "mlp.act_fn", "mlp.down_proj", "gated")
_PLAIN = (_L, "mlp.act_fn", "mlp.down_proj", "plain")
_FF = (_L, "feed_forward.act_fn", "feed_forward.down_proj", "gated")
_FUSED = (_L, "mlp.activation_fn", "mlp.down_proj", "fused")  # gate_up_proj, act on its first half
_NEOX = ("transformer.h", "mlp.act", "mlp.c_proj", "plain")
# Mixture-of-experts models whose first layer is dense (its MoE layer 2 is checked with MOE_EXPERTS).
DENSE_FIRST_MOE = (
    "afmoe",
    "dots3_note_text",
    "ernie4_5_moe",
    "exaone_moe",
    "glm4_moe",
    "glm4_moe_lite",
    "hy_v3",
    "kimi_linear",
    "laguna",
    "sarvam_moe",
)
# model type -> (decoder layers, activation module, down projection, MLP kind): module paths inside
# layer {i} written from each architecture's modeling code (None activation: applied as a function).
ORACLE: dict[str, tuple[str, str | None, str, str]] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "bailing_hybrid",
            "beam",
            "cohere",
            "cohere2",
            "cwm",
            "diffllama",
            "doge",
            "ernie4_5",
            "exaone",
            "exaone4",
            "flint",
            "gemma",
            "gemma2",
            "gemma3_text",
            "granite",
            "granite_swa",
            "helium",
            "hunyuan_v1_dense",
            "hyperclovax",
            "internlm3",
            "iquestcoder",
            "ministral",
            "ministral3",
            "olmo",
            "olmo2",
            "olmo3",
            "olmo_hybrid",
            "qwen3_5_text",
            "seed_oss",
            "smollm3",
            "stablelm",
            "vaultgemma",
        ],
        _LLAMA,
    ),
    **dict.fromkeys(["apertus", "apertus1p5_text", "arcee", "jais2", "nemotron"], _PLAIN),
    **dict.fromkeys(["bamba", "falcon_h1"], _FF),
    **dict.fromkeys(["glm", "glm4", "phi3"], _FUSED),
    **dict.fromkeys(["gpt2", "gpt-sw3", "gpt_bigcode"], _NEOX),
    "biogpt": ("biogpt.layers", "activation_fn", "fc2", "plain"),  # fc1/fc2 directly on the layer
    "xglm": (_L, "activation_fn", "fc2", "plain"),
    "opt": ("model.decoder.layers", "activation_fn", "fc2", "plain"),
    "phi": (_L, "mlp.activation_fn", "mlp.fc2", "plain"),
    "nanochat": (_L, "mlp.activation_fn", "mlp.fc2", "plain"),
    "gpt_neox": ("gpt_neox.layers", "mlp.act", "mlp.dense_4h_to_h", "plain"),
    "gpt_neox_japanese": ("gpt_neox_japanese.layers", "mlp.act", "mlp.dense_4h_to_h", "plain"),
    "persimmon": (_L, "mlp.act", "mlp.dense_4h_to_h", "plain"),
    "bloom": ("transformer.h", "mlp.gelu_impl", "mlp.dense_4h_to_h", "plain"),
    "codegen": ("transformer.h", "mlp.act", "mlp.fc_out", "plain"),
    "gptj": ("transformer.h", "mlp.act", "mlp.fc_out", "plain"),
    "mpt": ("transformer.blocks", "ffn.act", "ffn.down_proj", "plain"),
    "starcoder2": (_L, "mlp.act", "mlp.c_proj", "plain"),
    "modernbert-decoder": (_L, "mlp.act", "mlp.Wo", "fused"),
    "recurrent_gemma": (_L, "mlp_block.act_fn", "mlp_block.down_proj", "gated"),
    "lfm2": (_L, None, "feed_forward.w2", "gated"),  # F.silu(w1 x) * w3 x inline
    "lfm3": (_L, None, "feed_forward.w2", "gated"),
    "openai-gpt": ("transformer.h", None, "mlp.c_proj", "plain"),  # one ACT_FNS instance for all layers
    # mixture-of-experts models whose first layer is dense: layer 1 only
    **dict.fromkeys(DENSE_FIRST_MOE, _LLAMA),
    "jamba": _FF,
}
# Hybrid or mixed models: the 1-based layers that have a dense MLP (default: 1 and 2).
DENSE_LAYERS: dict[str, tuple[int, ...]] = dict.fromkeys(
    [*DENSE_FIRST_MOE, "jamba"],
    (1,),
)
# Refused on purpose, with the words qcache's one-line error must contain.
REFUSED: dict[str, str] = {
    "bitnet": "does not confirm the gated MLP",  # a norm sits between act(gate)*up and down_proj
    "dory": "ran it 2 times",  # one layer's weights applied twice (looped layers)
    "hrm_text": "ran it 2 times",
    # experts called without the routing: Llama4TextExperts.forward(hidden_states) (the router scales the
    # inputs before), JetMoeParallelExperts.forward(inputs, expert_size)
    "llama4_text": "are called as forward",
    "jetmoe": "are called as forward",
}
MOE = "mixture-of-experts"
# Mixture-of-experts models: model type -> (experts module inside layer {i}, MoE layers (1-based), layout),
# written from each modeling file. Layouts: "gated" act_fn(x Wg^T) * (x Wu^T) from gate_up_proj (E, 2W, H),
# gate rows first; "gated-t" the same from (E, H, 2W) applied as x @ W (Aria); "custom" the class's own
# _apply_gate on x W^T (clamped / biased GLUs: down-in only); "custom-t-bias" that on x @ W + b (gpt-oss);
# "plain" act_fn(x Wu^T) from up_proj, no gate (act only).
_ME = "mlp.experts"
MOE_EXPERTS: dict[str, tuple[str, tuple[int, ...], str]] = {
    **dict.fromkeys(
        [
            "cohere2_moe",
            "flex_olmo",
            "hunyuan_v1_moe",
            "kolibri1",
            "lara_mini",
            "mellum",
            "minimax",
            "minimax_m2",
            "mixtral",
            "olmoe",
            "phimoe",
            "qwen2_moe",
            "qwen3_5_moe_text",
            "qwen3_moe",
            "qwen3_next",
            "qwen4_exp_text",
            "solar_open",
        ],
        (_ME, (1, 2), "gated"),
    ),
    **dict.fromkeys(
        [*DENSE_FIRST_MOE, "axk1", "axk2", "deepseek_v2", "mimo_v2_flash", "sarvam_mla"], (_ME, (2,), "gated")
    ),
    **dict.fromkeys(
        ["granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"],
        ("block_sparse_moe.experts", (1, 2), "gated"),
    ),
    **dict.fromkeys(
        ["deepseek_v4", "inkling2_text", "inkling2_loop_text", "minimax_m3_vl_text"], (_ME, (1, 2), "custom")
    ),
    "hy_v4": (_ME, (2,), "custom"),
    "aria_text": (_ME, (1, 2), "gated-t"),
    "gpt_oss": (_ME, (1, 2), "custom-t-bias"),
    "jamba": ("feed_forward.experts", (2,), "gated"),
    "nemotron_h": ("mixer.experts", (2,), "plain"),
}


# Full `qcache extract` runs (the rest is checked in-process, to keep the suite fast): one per MLP shape.
CLI_TYPES = ("llama", "gemma2", "phi3", "bloom", "gpt_bigcode", "olmo2", "lfm2", "openai-gpt", "afmoe")
CLI_TYPES += ("xglm",)
QUANT_TYPES = ("llama", "gemma", "phi3", "gpt2", "olmo2")
QUANT_FAST = ("llama", "phi3")  # the others are marked slow: bitsandbytes on a CPU costs 5-20 s a run


def _tiny(model_type: str) -> torch.nn.Module:
    """The tiny model of ``model_type``, or a skip saying why there is none."""
    if model_type in SKIP:
        pytest.skip(f"{model_type}: {SKIP[model_type]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = build(model_type)
        except Exception as exc:
            pytest.skip(f"{model_type}: no tiny model from its config ({type(exc).__name__}: {exc})"[:300])
        try:
            with torch.no_grad():
                model(input_ids=torch.arange(3, 11)[None], use_cache=False)
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            pytest.skip(f"{model_type}: the tiny config cannot run a forward ({why})")
    return model


def _oracle(model, layer_path: str, rel: str | None, ids: np.ndarray, *, pre: bool) -> np.ndarray:
    """The tensor at ``layer_path.rel`` (output, or input if ``pre``) for ``ids`` alone, (tokens, width)."""
    seen: dict[str, torch.Tensor] = {}
    module = model.get_submodule(layer_path if rel is None else f"{layer_path}.{rel}")

    def grab(_m, args, out=None):
        t = args[0] if pre else out
        seen["t"] = t[0] if isinstance(t, (tuple, list)) else t

    handle = module.register_forward_pre_hook(grab) if pre else module.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(ids, dtype=torch.long)[None], use_cache=False)
    finally:
        handle.remove()
    return seen["t"].float().reshape(len(ids), -1).numpy()


def _taps_of(model_type: str) -> list[str]:
    _, act, _, kind = ORACLE[model_type]
    return (["act"] if act else []) + (["down-in"] if kind != "plain" or not act else []) + ["resid"]


def _references(model, model_type: str, layer: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    layers_path, act, down, _ = ORACLE[model_type]
    where = f"{layers_path}.{layer - 1}"
    out = {"resid": _oracle(model, where, None, ids, pre=False)}
    if act:
        out["act"] = _oracle(model, where, act, ids, pre=False)
    out["down-in"] = _oracle(model, where, down, ids, pre=True)
    return out


# Hybrid models whose Mamba / linear-attention mixers run as slow pure-PyTorch loops on a CPU (15-25 s each)
SLOW = ("bailing_hybrid", "bamba", "falcon_h1", "kimi_linear")


@pytest.mark.parametrize(
    "model_type", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in causal_lm_types()]
)
def test_every_causal_lm_type(model_type):
    """qcache's taps (discovery, probe, hooks) on one forward equal the hand-written module paths'."""
    from qcache.extract.arch.adapters import ModelTaps
    from qcache.extract.run.hooks import Capture, capturing
    from qcache.store.errors import QCacheError

    model = _tiny(model_type)
    if model_type in REFUSED:
        with pytest.raises(QCacheError, match=REFUSED[model_type]):
            ModelTaps(model)
        return
    if model_type in MOE_EXPERTS:
        _check_experts(model, model_type)
    if model_type not in ORACLE:
        if model_type in MOE_EXPERTS:
            return
        try:
            found = ModelTaps(model).structure
        except QCacheError as exc:
            assert MOE not in str(exc), f"{model_type}: an MoE type missing from MOE_EXPERTS or REFUSED"
            pytest.skip(f"{model_type}: no hand-written oracle paths; qcache refuses: {exc}"[:300])
        assert not any(t.experts for t in found.layers), f"{model_type}: MoE, missing from MOE_EXPERTS"
        pytest.skip(f"{model_type}: no hand-written oracle paths yet; qcache finds {found.layers_path}")
    taps = ModelTaps(model)
    ids = np.array([5, 9, 13, 17, 21, 25, 29])
    for layer in DENSE_LAYERS.get(model_type, (1, 2)):
        refs = _references(model, model_type, layer, ids)
        capture = Capture()
        capture.last_index = torch.tensor([len(ids) - 1])
        with torch.no_grad(), capturing(taps, [(layer, t) for t in _taps_of(model_type)], capture):
            x = torch.tensor(ids)[None]
            model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
        for tap in _taps_of(model_type):
            got = taps.as_tokens(capture.tensors[(layer, tap)], 1, len(ids))[0].float().numpy()
            ref = refs[tap]
            assert np.abs(ref).max() > 1e-2, f"{tap} near zero: the test weights are too small"
            assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= 1e-5, (layer, tap)
    if ORACLE[model_type][1] is None:
        with pytest.raises(QCacheError, match="--tap act is not available"):
            taps.tap(1, "act")


def _expert_oracle(model, model_type: str, layer: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """What the experts module of ``layer`` received, and each token's values at its top-k experts
    ``(tokens, k, W)`` computed here from the module's weights (layouts: ``MOE_EXPERTS``); checked against
    the module's own output."""
    rel, _, layout = MOE_EXPERTS[model_type]
    experts = model.get_submodule(f"model.layers.{layer - 1}.{rel}")
    seen = {}

    def grab(_m, args, kwargs, out):
        seen["in"] = [*args, *kwargs.values()][:3]
        seen["out"] = out

    handle = experts.register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(ids)[None], use_cache=False)
    finally:
        handle.remove()
    hidden, top, weights = seen["in"]
    transposed, bias = layout.endswith(("-t", "-t-bias")), layout.endswith("-bias")
    up_w = experts.up_proj if layout == "plain" else experts.gate_up_proj
    k = top.shape[1]
    act = torch.full((len(hidden), k, 128), float("nan"))
    down = torch.full((len(hidden), k, 128), float("nan"))
    total = torch.zeros(seen["out"].shape)
    with torch.no_grad():
        for e in range(up_w.shape[0]):
            rows, slot = torch.nonzero(top == e, as_tuple=True)
            proj = hidden[rows] @ (up_w[e] if transposed else up_w[e].T)
            if bias:
                proj = proj + experts.gate_up_proj_bias[e]
            if layout.startswith("custom"):
                d = experts._apply_gate(proj)  # the model's own gating function
            elif layout == "plain":
                d = act[rows, slot] = experts.act_fn(proj)
            else:
                gate, up = proj.chunk(2, dim=-1)
                act[rows, slot] = experts.act_fn(gate)
                d = experts.act_fn(gate) * up
            down[rows, slot] = d
            y = d @ (experts.down_proj[e] if transposed else experts.down_proj[e].T)
            if bias:
                y = y + experts.down_proj_bias[e]
            total.index_add_(0, rows, y * weights[rows, slot, None])
    out = seen["out"].float()
    assert float((total - out).abs().max()) <= 1e-4 * float(out.abs().max()), "the oracle misses the output"
    return {"act": act.numpy(), "down-in": down.numpy(), "ids": top.numpy(), "weights": weights.numpy()}


def _check_experts(model, model_type: str) -> None:
    """qcache's routing and per-expert values of each MoE layer, on one forward, equal the oracle's."""
    from qcache.extract.arch.adapters import ModelTaps
    from qcache.extract.run.hooks import Capture, capturing
    from qcache.store.errors import QCacheError

    _, layers, layout = MOE_EXPERTS[model_type]
    taps = ModelTaps(model)
    assert sorted(taps.moe) == list(layers), (model_type, sorted(taps.moe))
    offered = {"gated": ["act", "down-in"], "plain": ["act"]}.get(layout.split("-")[0], ["down-in"])
    ids = np.array([5, 9, 13, 17, 21, 25, 29])
    for layer in layers:
        refs = _expert_oracle(model, model_type, layer, ids)
        assert np.isfinite(refs["ids"]).all() and refs["ids"].shape == (len(ids), 2)
        capture = Capture()
        capture.last_index = torch.tensor([len(ids) - 1])
        with torch.no_grad(), capturing(taps, [(layer, t) for t in offered], capture):
            x = torch.tensor(ids)[None]
            model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
        got_ids, got_w = capture.router[layer]
        assert np.array_equal(got_ids.numpy(), refs["ids"]) and np.array_equal(got_w.numpy(), refs["weights"])
        for tap in offered:
            got, ref = capture.experts[(layer, tap)].float().numpy(), refs[tap]
            assert np.abs(ref).max() > 1e-2, f"{tap} near zero: the test weights are too small"
            assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= 1e-5, (layer, tap)
        for tap in {"act", "down-in"} - set(offered):
            with pytest.raises(QCacheError, match=f"--tap {tap} is not available at layer {layer}"):
                taps.tap(layer, tap)


def _extract(tmp_path, model_dir, taps: list[str], layers: tuple[int, ...], bits: int = 32):
    args = [a for t in taps for a in ("--tap", t)]
    # --batch-size 1: the same shapes as the one-example oracle (float32 sums in the same order; LLM.int8
    # outlier columns chosen per example)
    opts = ("--layers", ",".join(map(str, layers)), "--batch-size", "1", *args)
    return CliRunner().invoke(main, extract_args(model_dir, tmp_path / "s", *opts, bits=bits, limit=3))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny models saved with the tiny tokenizer, made on first use."""
    root = tmp_path_factory.mktemp("arch-models")
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = root / model_type
            _tiny(model_type).save_pretrained(made[model_type])
            tiny_tokenizer().save_pretrained(made[model_type])
        return made[model_type]

    return get


@pytest.mark.parametrize("model_type", CLI_TYPES)
def test_qcache_extract_matches_the_module_paths(tmp_path, saved, model_type):
    """`qcache extract` at 32 bits, every tap the architecture offers, against a plain hooked forward."""
    model_dir = saved(model_type)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    taps, layers = _taps_of(model_type), DENSE_LAYERS.get(model_type, (1, 2))
    result = _extract(tmp_path, model_dir, taps, layers)
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    run = s.run(s.runs()[0])
    assert run.manifest["taps"] == taps and run.manifest["family"] == model_type
    ids_all = run.token_index()["token_id"].to_numpy()
    for layer in layers:
        for tap in taps:
            got = run.activations(layer, tap).compute()
            assert got.shape[1] == (64 if tap == "resid" else run.manifest["n_neurons"])
            for e in range(run.layout.n_examples):
                s0, n = int(run.layout.starts[e]), int(run.layout.lengths[e])
                ref = _references(model, model_type, layer, ids_all[s0 : s0 + n])[tap]
                assert float(np.abs(got[s0 : s0 + n] - ref).max()) <= 1e-5, (layer, tap, e)
    if "act" not in taps:
        result = _extract(tmp_path / "x", model_dir, ["act"], (1,))
        assert result.exit_code == 2 and "--tap act is not available" in result.output, result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "model_type", [t if t in QUANT_FAST else pytest.param(t, marks=pytest.mark.slow) for t in QUANT_TYPES]
)
def test_quantized_extract_matches_a_same_config_model(tmp_path, saved, model_type, bits):
    """8 and 4 bits, --batch-size 1, against the model loaded with the same BitsAndBytesConfig."""
    pytest.importorskip("bitsandbytes")
    model_dir = saved(model_type)
    bnb = (
        tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        if bits == 8
        else tf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16,
        )
    )
    kwargs = {"dtype": torch.float16, "quantization_config": bnb, "device_map": {"": "cpu"}}
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    taps = _taps_of(model_type)
    result = _extract(tmp_path, model_dir, taps, (1, 2), bits=bits)
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    run = s.run(s.runs()[0])
    ids_all = run.token_index()["token_id"].to_numpy()
    for layer in (1, 2):
        for tap in taps:
            got = run.activations(layer, tap).compute().astype(np.float32)
            for e in range(run.layout.n_examples):
                s0, n = int(run.layout.starts[e]), int(run.layout.lengths[e])
                ref = _references(model, model_type, layer, ids_all[s0 : s0 + n])[tap]
                # float16 compute: qcache widens CPU half matmuls to float32 (cpu_half.py), the plain
                # model does not, so values agree to a few float16 ulps of the largest, not bit for bit
                assert np.abs(got[s0 : s0 + n] - ref).max() <= 5e-3 * np.abs(ref).max(), (layer, tap, e)


def test_unsupported_model_refused_from_its_config_alone(tmp_path):
    """A mixture-of-experts model qcache cannot tap, with no weight file at all: refused from config.json,
    one line (Llama 4's experts are called without the routing)."""
    model_dir = tmp_path / "llama4_text"
    tiny_config("llama4_text").save_pretrained(model_dir)  # config.json only: no weights to load
    tiny_tokenizer().save_pretrained(model_dir)
    result = CliRunner().invoke(main, extract_args(model_dir, tmp_path / "s"))
    assert result.exit_code == 2, result.output
    assert MOE in result.output and "top_k_index" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("manifest*"))


def test_resid_is_analyzed_at_its_own_width(tmp_path, saved):
    """dead and redundancy on the hidden-size resid arrays next to MLP-width act arrays."""
    result = _extract(tmp_path, saved("llama"), ["act", "resid"], (1, 2))
    assert result.exit_code == 0, result.output
    for cmd in ("dead", "redundancy"):
        out = CliRunner().invoke(main, ["analyze", cmd, "--tap", "resid", "--store", str(tmp_path / "s")])
        assert out.exit_code == 0, out.output
    from qcache.store.tables import run_sql

    results = store.open(tmp_path / "s").results
    _, rows = run_sql(results, "SELECT DISTINCT n_neurons FROM redundancy_summary")
    assert rows == [(64,)]  # the hidden size, not the MLP width of the manifest's n_neurons (128)

    # the act rows are added beside the resid rows, each saying its tap, and neither replaces the other
    for cmd in ("dead", "redundancy"):
        out = CliRunner().invoke(main, ["analyze", cmd, "--store", str(tmp_path / "s")])
        assert out.exit_code == 0, out.output
    for table in ("dead_neurons", "redundancy_summary", "neuron_stats"):
        _, rows = run_sql(results, f"SELECT tap, layer, count(*) FROM {table} GROUP BY ALL ORDER BY ALL")
        assert [(t, n) for t, n, _ in rows] == [("act", 1), ("act", 2), ("resid", 1), ("resid", 2)], table
    _, rows = run_sql(results, "SELECT tap, n_neurons FROM dead_neurons WHERE layer = 1 ORDER BY tap")
    assert rows == [("act", 128), ("resid", 64)]
    s = store.open(tmp_path / "s")
    run = s.run(s.runs()[0])
    x = run.activations(1, "resid").compute().astype(np.float64)
    r = np.abs(np.corrcoef(x.T)[np.triu_indices(64, 1)])  # numpy oracle of the resid rows' pairs
    _, rows = run_sql(results, "SELECT pairs_above FROM redundancy_summary WHERE tap = 'resid' AND layer = 1")
    assert rows == [(int((r >= 0.8).sum()),)]
