"""The CUDA tests' oracle comparisons, run on the CPU: they pass on a right extraction and catch a wrong one.

Also the pieces of the GPU check that need no GPU: the random 7B-shaped model's config and the gzipped
tokenizer that scripts/gpu-wheels.sh ships.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from tests.commands import extract_args
from tests.gpu.compare import activation_errors, attribution_errors, direct_model


def _run(tmp_path, model, *extra: str, bits: int = 32) -> store.Run:
    result = CliRunner().invoke(main, [*extract_args(model, tmp_path / "s", bits=bits, limit=3), *extra])
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    return s.run(s.runs()[0])


def test_activation_oracle_passes_and_catches(tmp_path, tiny_models):
    run = _run(tmp_path, tiny_models["llama"], "--layers", "1,3")
    oracle = direct_model(tiny_models["llama"], 32, "cpu")
    assert max(err for *_, err in activation_errors(run, oracle)) <= 1e-4
    # another model's weights: the comparison must fail loudly
    other = direct_model(tiny_models["llama"], 32, "cpu")
    for p in other.parameters():
        if p.dim() == 2:
            p.data.mul_(1.01)
    assert max(err for *_, err in activation_errors(run, other)) > 1e-3


def test_attribution_oracle_passes_and_catches(tmp_path, tiny_models):
    run = _run(tmp_path, tiny_models["llama"], "--layers", "3", "--attributions", "--ig-steps", "8")
    oracle = direct_model(tiny_models["llama"], 32, "cpu")
    errors = attribution_errors(run, oracle, 8)
    assert max(err for *_, err in errors) <= 1e-3, errors
    wrong = attribution_errors(run, oracle, 2)  # Captum with other steps: different numbers
    assert max(err for *_, err in wrong) > 1e-3


def test_seven_b_config_and_gzipped_tokenizer(tmp_path):
    from benchmarks.random_model import llama_config, load_tokenizer
    from tests.models import tiny_tokenizer

    cfg = llama_config("7b", 4, 512)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (4096, 11008, 32)
    assert cfg.num_hidden_layers == 4 and cfg.vocab_size == 512
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "plain")
    packed = tmp_path / "packed"
    packed.mkdir()
    for f in (tmp_path / "plain").iterdir():
        (packed / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    text = "Respond with True or False only.\nAnswer:"
    assert load_tokenizer(packed)(text).input_ids == tok(text).input_ids
    with pytest.raises(ValueError, match="shape"):
        llama_config("13b", 4, 512)
    assert np.isfinite(cfg.rms_norm_eps)
