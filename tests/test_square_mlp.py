"""MLPs whose width equals the hidden size (issue #15): every Linear of the block then maps hidden -> hidden,
so the structure alone does not say which is the down projection; the probe forward must settle it.

Oracle: a plain forward hook on ``mlp.act_fn`` (output) and a pre-hook on ``mlp.down_proj`` (input) of the
transformers model, one example at a time, against ``qcache extract`` at 32 bits."""

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
from tests.arch_models import HIDDEN, tiny_config, tiny_tokenizer
from tests.commands import extract_args

# model type -> (config fields set to the hidden size, {layer: its MLP block (act_fn and down_proj inside)})
SQUARE = {
    "llama": (("intermediate_size",), {1: "mlp", 2: "mlp"}),
    # layer 1 dense, layer 2 MoE with a 64 -> 64 shared expert
    "glm4_moe": (("intermediate_size", "moe_intermediate_size"), {1: "mlp", 2: "mlp.shared_experts"}),
}


def _save(model_type: str, directory: Path) -> Path:
    """The tiny model of ``model_type`` with its MLP widths set to the hidden size (64), saved."""
    fields, _ = SQUARE[model_type]
    config = tiny_config(model_type)
    for f in fields:
        setattr(config, f, HIDDEN)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # as tests/arch_models.py: weights large enough for activations to spread
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def _hooked(model, ids: np.ndarray, block: str) -> dict[str, np.ndarray]:
    """``act`` (act_fn's output) and ``down-in`` (down_proj's input) of ``block`` for ``ids``, (tokens, W)."""
    seen: dict[str, torch.Tensor] = {}
    act = model.get_submodule(f"{block}.act_fn").register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("act", out)
    )
    down = model.get_submodule(f"{block}.down_proj").register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("down-in", args[0])
    )
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(ids, dtype=torch.long)[None], use_cache=False)
    finally:
        act.remove()
        down.remove()
    return {k: v.reshape(len(ids), -1).float().numpy() for k, v in seen.items()}


@pytest.mark.parametrize("model_type", list(SQUARE))
def test_square_mlp_extracts_the_module_paths(tmp_path, model_type):
    model_dir = _save(model_type, tmp_path / model_type)
    _, blocks = SQUARE[model_type]
    opts = ("--tap", "act", "--tap", "down-in", "--layers", "1,2", "--batch-size", "1")
    result = CliRunner().invoke(main, extract_args(model_dir, tmp_path / "s", *opts, bits=32, limit=3))
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    run = s.run(s.runs()[0])
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids_all = run.token_index()["token_id"].to_numpy()
    for layer, block in blocks.items():
        stored = {tap: run.activations(layer, tap).compute() for tap in ("act", "down-in")}
        for e in range(run.layout.n_examples):
            s0, n = int(run.layout.starts[e]), int(run.layout.lengths[e])
            ref = _hooked(model, ids_all[s0 : s0 + n], f"model.layers.{layer - 1}.{block}")
            for tap, got in stored.items():
                assert got.shape[1] == HIDDEN
                assert float(np.abs(got[s0 : s0 + n] - ref[tap]).max()) <= 1e-5, (layer, tap, e)
