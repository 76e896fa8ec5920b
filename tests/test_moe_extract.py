"""`qcache extract` on mixture-of-experts models against an oracle written here from the modeling code.

The oracle runs each example alone through the plain transformers model (its default experts kernel) with
a forward hook on ``model.layers[i].mlp.experts`` that records what the experts module receives (hidden
states, top-k ids and weights, as ``MixtralSparseMoeBlock.forward`` passes them) and returns. For each
expert ``e`` it then computes ``silu(x Wg[e]^T)`` and ``* (x Wu[e]^T)`` from ``gate_up_proj`` (``(E, 2W,
H)``: gate rows first) itself, NaN in the rows not routed to ``e``. The oracle is checked against the
model: ``sum_e w * (down_in_e @ Wd[e]^T)`` must give the experts module's output back.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from tests.arch_models import build, tiny_tokenizer
from tests.commands import extract_args

# model type -> (experts module in a layer, shared expert module or None, MoE layers, dense layers)
MOE_MODELS = {
    "mixtral": ("mlp.experts", None, (1, 2), ()),
    "qwen2_moe": ("mlp.experts", "mlp.shared_expert", (1, 2), ()),
    "qwen3_moe": ("mlp.experts", None, (1, 2), ()),
    "olmoe": ("mlp.experts", None, (1, 2), ()),
    "glm4_moe": ("mlp.experts", "mlp.shared_experts", (2,), (1,)),  # first layer dense
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-models")
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build(model_type).save_pretrained(root / model_type)
            tiny_tokenizer().save_pretrained(root / model_type)
            made[model_type] = root / model_type
        return made[model_type]

    return get


def _extract(tmp_path: Path, model_dir: Path, *opts: str, bits: int = 32, limit: int = 3):
    args = extract_args(model_dir, tmp_path / "s", "--batch-size", "1", *opts, bits=bits, limit=limit)
    return CliRunner().invoke(main, args)


def _forward_hooks(model, ids: np.ndarray, modules: dict[str, str]) -> dict[str, object]:
    """One forward of ``ids``; ``modules``: name -> "path:in" | "path:out" | "path:experts"."""
    seen: dict[str, object] = {}
    handles = []
    for name, spec in modules.items():
        path, what = spec.rsplit(":", 1)
        module = model.get_submodule(path)
        if what == "experts":

            def grab(_m, args, out, name=name):
                hidden, top_k_index, top_k_weights = args
                seen[name] = (hidden.clone(), top_k_index.clone(), top_k_weights.clone(), out.clone())

            handles.append(module.register_forward_hook(grab))
        elif what == "in":
            handles.append(module.register_forward_pre_hook(lambda _m, a, n=name: seen.__setitem__(n, a[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, a, o, n=name: seen.__setitem__(n, o)))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(ids, dtype=torch.long)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _expert_oracle(experts, seen) -> dict[str, np.ndarray]:
    """Per expert act / down-in (tokens, W) with NaN where not routed; ids, weights; checked against the
    module's own output."""
    hidden, ids, weights, out = seen
    wgu, wd = experts.gate_up_proj.detach(), experts.down_proj.detach()  # (E, 2W, H), (E, H, W)
    n_experts, width = wgu.shape[0], wgu.shape[1] // 2
    act = np.full((n_experts, hidden.shape[0], width), np.nan, np.float32)
    down = np.full_like(act, np.nan)
    total = torch.zeros_like(out)
    for e in range(n_experts):
        rows, slot = torch.nonzero(ids == e, as_tuple=True)
        if not len(rows):
            continue
        x = hidden[rows]
        gate = x @ wgu[e, :width].T
        up = x @ wgu[e, width:].T
        a = torch.nn.functional.silu(gate)
        act[e, rows.numpy()] = a.numpy()
        down[e, rows.numpy()] = (a * up).numpy()
        total.index_add_(0, rows, ((a * up) @ wd[e].T) * weights[rows, slot, None])
    # the oracle reproduces what the model's experts module returned
    assert float((total - out).abs().max()) <= 1e-5 * max(1.0, float(out.abs().max()))
    return {"act": act, "down-in": down, "ids": ids.numpy(), "weights": weights.float().numpy()}


@pytest.mark.parametrize("model_type", list(MOE_MODELS))
def test_moe_extract_matches_an_oracle(tmp_path, saved, model_type):
    """act and down-in per expert, the router arrays, the shared expert's dense tap and the manifest."""
    experts_rel, shared_rel, moe_layers, dense_layers = MOE_MODELS[model_type]
    model_dir = saved(model_type)
    all_layers = sorted((*moe_layers, *dense_layers))
    result = _extract(
        tmp_path, model_dir, "--tap", "act", "--tap", "down-in", "--layers", ",".join(map(str, all_layers))
    )
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    run = s.run(s.runs()[0])
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    manifest = run.manifest
    assert sorted(manifest["moe"]) == [str(n) for n in moe_layers]
    group = run.dir
    ids_all = run.token_index()["token_id"].to_numpy()
    checked_rows = 0
    for n in moe_layers:
        entry = manifest["moe"][str(n)]
        experts = model.get_submodule(f"model.layers.{n - 1}.{experts_rel}")
        assert entry == {
            "n_experts": 4,
            "top_k": 2,
            "expert_neurons": 128,
            "shared_expert": shared_rel is not None,
            "experts_module": f"model.layers.{n - 1}.{experts_rel}",
            "router_module": entry["router_module"],
            "experts_quantized": False,
            "expert_taps": ["act", "down-in"],
        }
        assert entry["router_module"].startswith(f"model.layers.{n - 1}.mlp")
        stored = _read_layer(group, n, 4)
        for e in range(run.layout.n_examples):
            s0, length = int(run.layout.starts[e]), int(run.layout.lengths[e])
            hooks = {"x": f"model.layers.{n - 1}.{experts_rel}:experts"}
            if shared_rel:
                hooks["shared_act"] = f"model.layers.{n - 1}.{shared_rel}.act_fn:out"
                hooks["shared_down"] = f"model.layers.{n - 1}.{shared_rel}.down_proj:in"
            seen = _forward_hooks(model, ids_all[s0 : s0 + length], hooks)
            ref = _expert_oracle(experts, seen["x"])
            rows = slice(s0, s0 + length)
            assert np.array_equal(stored["ids"][rows], ref["ids"])
            assert stored["ids"].dtype == np.int16 and stored["weights"].dtype == np.float32
            assert np.abs(stored["weights"][rows] - ref["weights"]).max() <= 1e-6
            for tap in ("act", "down-in"):
                got = stored[tap][:, rows]  # (E, tokens, W)
                assert np.array_equal(np.isnan(got), np.isnan(ref[tap])), (n, tap, e)
                assert np.nanmax(np.abs(got - ref[tap])) <= 1e-5, (n, tap, e)
            if shared_rel:
                for tap, key in (("act", "shared_act"), ("down-in", "shared_down")):
                    got = run.activations(n, tap).compute()[rows]
                    ref_shared = seen[key].reshape(length, -1).numpy()  # (tokens, W): the block flattens
                    assert np.abs(got - ref_shared).max() <= 1e-5
            checked_rows += length
    assert checked_rows > 0
    for n in moe_layers:
        if shared_rel is None:  # no dense activations without a shared expert
            assert not (group / f"layers/L{n:03d}/activations").exists()
    for n in dense_layers:
        seen = _forward_hooks(
            model, ids_all[: int(run.layout.lengths[0])], {"a": f"model.layers.{n - 1}.mlp.act_fn:out"}
        )
        got = run.activations(n, "act").compute()[: int(run.layout.lengths[0])]
        assert np.abs(got - seen["a"][0].numpy()).max() <= 1e-5


def _read_layer(group: Path, n: int, n_experts: int) -> dict[str, np.ndarray]:
    """The MoE arrays of layer ``n`` read with zarr directly (the contract's paths and metadata)."""
    import zarr

    base = f"layers/L{n:03d}"
    ids = zarr.open_array(str(group / f"{base}/router/topk_ids"), mode="r")
    weights = zarr.open_array(str(group / f"{base}/router/topk_weights"), mode="r")
    meta = json.loads((group / f"{base}/router/topk_ids/zarr.json").read_text())
    assert meta["fill_value"] == -1 and meta["dimension_names"] == ["token", "topk"]
    out = {"ids": ids[:], "weights": weights[:]}
    for tap, name in (("act", "activations"), ("down-in", "down_in")):
        arrays = [
            zarr.open_array(str(group / f"{base}/experts/E{e:03d}/{name}"), mode="r")
            for e in range(n_experts)
        ]
        meta = json.loads((group / f"{base}/experts/E000/{name}/zarr.json").read_text())
        assert meta["dimension_names"] == ["token", "neuron"]
        out[tap] = np.stack([a[:] for a in arrays]).astype(np.float32)
    return out


def _moe_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array under a run's layers/ group, by path (zarr directly)."""
    import zarr

    s = store.open(path)
    run = s.run(s.runs()[0])
    group = zarr.open_group(str(run.dir / "layers"), mode="r")
    return {name: np.asarray(a[:]) for name, a in group.arrays()} | {
        f"{g}/{name}": np.asarray(a[:]) for g, sub in group.groups() for name, a in _walk(sub)
    }


def _walk(group) -> list:
    out = [(name, a) for name, a in group.arrays()]
    for g, sub in group.groups():
        out += [(f"{g}/{name}", a) for name, a in _walk(sub)]
    return out


def test_moe_resume_after_a_kill_and_verify(tmp_path, saved):
    """Killed after a unit's chunks are written (before its marker), resumed: every router and expert
    array equals an uninterrupted run's, and `qcache verify` checks them (crc over the int16 arrays too)."""
    import os
    import signal
    import subprocess

    from tests.commands import as_process

    model_dir = saved("mixtral")
    opts = ("--tap", "act", "--tap", "down-in", "--layers", "1,2", "--chunk-rows", "16")
    ref = _extract(tmp_path / "ref", model_dir, *opts, limit=6)
    assert ref.exit_code == 0, ref.output
    argv = as_process(extract_args(model_dir, tmp_path / "s", "--batch-size", "1", *opts, limit=6))
    env = {**os.environ, "QCACHE_CRASH_AT": "chunks-written:1"}
    crashed = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run = store.open(tmp_path / "s").run(store.open(tmp_path / "s").runs()[0])
    assert 0 in run.done_units() and 1 not in run.done_units() and run.layout.n_units > 2
    resumed = _extract(tmp_path, model_dir, *opts, limit=6)
    assert resumed.exit_code == 0 and "resuming: 1 of" in resumed.output, resumed.output
    a, b = _moe_arrays(tmp_path / "ref" / "s"), _moe_arrays(tmp_path / "s")
    assert a.keys() == b.keys() and "L001/router/topk_ids" in a and "L002/experts/E003/down_in" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (a["L001/router/topk_ids"] >= 0).all()  # every committed row routed
    verified = CliRunner().invoke(main, ["verify", "--store", str(tmp_path / "s")])
    assert verified.exit_code == 0, verified.output
    marker = json.loads(next((run.files / "_progress").iterdir()).read_text())
    assert (
        "layers/L002/router/topk_ids" in marker["crc32"]
        and "layers/L001/experts/E000/activations" in marker["crc32"]
    )


def test_moe_attributions_refused_in_one_line(tmp_path, saved):
    result = _extract(tmp_path, saved("mixtral"), "--attributions", "--layers", "1")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--attributions at mixture-of-experts layer(s) [1]" in lines[0], lines
    assert "per expert is not implemented" in lines[0]


def test_moe_4bit_experts_stay_float(tmp_path, saved):
    """NF4 (bitsandbytes, --batch-size 1) on mixtral: bitsandbytes replaces nn.Linear only, so the fused
    3-D expert weights stay float16 (checked here on a model loaded with the same config); the manifest says
    so and extraction prints one note."""
    pytest.importorskip("bitsandbytes")
    model_dir = saved("mixtral")
    bnb = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float16, quantization_config=bnb, device_map={"": "cpu"}
        )
    experts = model.model.layers[0].mlp.experts
    found = not (
        type(experts.gate_up_proj.data) is torch.Tensor and experts.gate_up_proj.dtype == torch.float16
    )
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # Linears are quantized
    result = _extract(
        tmp_path, model_dir, "--tap", "act", "--tap", "down-in", "--layers", "1,2", bits=4, limit=2
    )
    assert result.exit_code == 0, result.output
    run = store.open(tmp_path / "s").run(store.open(tmp_path / "s").runs()[0])
    assert [e["experts_quantized"] for e in run.manifest["moe"].values()] == [found, found]
    assert not found
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: bitsandbytes quantizes Linear layers only: the 3-D expert weights of "
        "model.layers.*.mlp.experts stay float16 in nf4 (manifest moe experts_quantized: false)"
    ]
    stored = _read_layer(run.dir, 1, 4)
    routed = np.stack([(stored["ids"] == e).any(axis=1) for e in range(4)])  # (E, tokens)
    assert np.array_equal(~np.isnan(stored["act"]).all(axis=2), routed)
    assert np.isfinite(stored["act"][routed]).all()


def test_probe_refuses_experts_it_cannot_reproduce():
    """An experts module whose output is not what its weights give (here: scaled after the loop) is
    refused by the probe, naming the module; the values qcache would store cannot be trusted."""
    from qcache.extract.arch.adapters import ModelTaps
    from qcache.store.errors import InvalidName

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build("mixtral")
    experts = model.model.layers[1].mlp.experts
    plain = experts.forward
    experts.forward = lambda *a, **k: plain(*a, **k) * 1.01
    with pytest.raises(InvalidName, match=r"does not confirm the experts of model\.layers\.1\.mlp\.experts"):
        ModelTaps(model)
