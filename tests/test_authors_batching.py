"""``--batching authors``: the authors' consecutive, left-padded, pad = EOS batches through ``generate``.

The oracle is the authors' own loop (src/0_softmax.py, src/utils.py), rewritten here: tokenizer padding
left, pad = EOS, ``model.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True,
output_logits=True)``, softmax of ``outputs.logits[0]``; activations by a plain forward hook on the tap
module during that call. Batches are consecutive groups of ``batch_size`` example ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from qcache.extract.run.batching import Batching
from qcache.store import TokenLayout
from tests.commands import extract_args

BATCH = 4


def _run(path, model, *options: str, bits: int = 32, limit: int = 13):
    result = CliRunner().invoke(main, extract_args(model, path, *options, bits=bits, limit=limit))
    return result


def _stored_ids(run) -> list[list[int]]:
    """Each example's token ids as the store holds them (the tokenization is not what is tested here)."""
    ids = np.asarray(run.token_index().to_pydict()["token_id"])
    return [ids[s : s + n].tolist() for s, n in zip(run.layout.starts, run.layout.lengths, strict=True)]


def authors_loop(model, tokenizer, ids: list[list[int]], batch_size: int, modules: dict[int, str]):
    """The authors' batches through ``generate``: per example (probs (vocab,), {layer: (tokens, neurons)})."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    seen: dict[int, torch.Tensor] = {}
    handles = [
        model.get_submodule(path).register_forward_hook(
            lambda _m, _a, out, n=n: seen.__setitem__(n, out.detach().clone())
        )
        for n, path in modules.items()
    ]
    out = []
    try:
        for b0 in range(0, len(ids), batch_size):
            inputs = tokenizer.pad(
                {"input_ids": ids[b0 : b0 + batch_size]}, padding=True, return_tensors="pt"
            )
            assert (inputs["input_ids"][inputs["attention_mask"] == 0] == tokenizer.eos_token_id).all()
            with torch.no_grad():
                gen = model.generate(
                    **inputs, max_new_tokens=1, return_dict_in_generate=True, output_logits=True
                )
            probs = torch.softmax(gen.logits[0], dim=-1)  # (batch, vocab)
            real = inputs["attention_mask"].bool()
            for i in range(real.shape[0]):
                acts = {n: seen[n][i][real[i]].float().numpy() for n in modules}  # (tokens, neurons)
                out.append((probs[i].numpy(), acts))
    finally:
        for h in handles:
            h.remove()
    return out


def label_ids(tokenizer, labels) -> list[list[int]]:
    """Each label's single-token spellings (w, " w", lower, capitalized, upper); shared ids dropped."""
    sets = []
    for w in labels:
        variants = {w, w.lower(), w.capitalize(), w.upper()}
        encoded = [tokenizer(t, add_special_tokens=False).input_ids for v in variants for t in (v, " " + v)]
        sets.append({ids[0] for ids in encoded if len(ids) == 1})
    shared = set.intersection(*sets) if len(sets) > 1 else set()
    return [sorted(s - shared) for s in sets]


def test_authors_batches_are_fixed_groups_of_consecutive_examples():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=57)
    layout = TokenLayout(lengths=lengths, chunk_rows=50)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    plan = Batching("authors", 6)
    groups = [tuple(range(g, min(g + 6, 57))) for g in range(0, 57, 6)]
    for unit in range(layout.n_units):
        r0, r1 = unit * 50, min(unit * 50 + 50, int(lengths.sum()))
        touching = {e for e in range(57) if starts[e] < r1 and starts[e] + lengths[e] > r0}
        want = [g for g in groups if touching & set(g)]
        assert [tuple(b.tolist()) for b in plan.unit_batches(layout, unit)] == want
    assert Batching("authors").size == 32 and Batching().size == 16


def test_authors_inputs_are_left_padded_with_generate_positions():
    ids = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    fwd = Batching("authors", 3).inputs(ids, np.arange(3), pad_id=2)
    np.testing.assert_array_equal(fwd.ids, [[5, 6, 7], [2, 2, 8], [2, 9, 10]])
    np.testing.assert_array_equal(fwd.model_mask, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    np.testing.assert_array_equal(fwd.position_ids, [[0, 1, 2], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(fwd.last_index, [2, 2, 2])
    full = Batching("authors", 3).inputs([np.array([1, 2])] * 2, np.arange(2), pad_id=2)
    assert full.model_mask is None  # generate drops a mask without padding


@pytest.fixture(scope="module")
def tiny_authors(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("authors") / "store"
    options = ("--batching", "authors", "--batch-size", str(BATCH), "--chunk-rows", "16", "--layers", "1,2")
    result = _run(path, tiny_models["llama"], *options)
    assert result.exit_code == 0, result.output
    return path


def test_tiny_fp32_activations_and_predictions_equal_the_authors_loop(tiny_authors, tiny_models):
    s = store.open(tiny_authors)
    run = s.run(s.runs()[0])
    b = run.manifest["batching"]
    assert (b["mode"], b["batch_size"], b["padding_side"], b["pad_token_id"]) == ("authors", BATCH, "left", 2)
    layout = run.layout
    owners, firsts = layout.owner_units, layout.starts // layout.chunk_rows
    assert (owners != firsts).any()  # some example straddles two units
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_models["llama"])
    ref = authors_loop(
        model, tokenizer, _stored_ids(run), BATCH, {n: f"model.layers.{n - 1}.mlp.act_fn" for n in (1, 2)}
    )
    preds = run.predictions().to_pydict()
    acts = {n: run.activations(n).compute() for n in (1, 2)}
    for e, (probs, ref_acts) in enumerate(ref):
        s0, n_tok = int(layout.starts[e]), int(layout.lengths[e])
        for n in (1, 2):
            np.testing.assert_array_equal(acts[n][s0 : s0 + n_tok], ref_acts[n], err_msg=f"example {e} L{n}")
        assert preds["top_token_id"][e] == int(probs.argmax())
        assert preds["top_token_prob"][e] == np.float32(probs.max())


def test_a_resume_with_other_batching_is_refused_in_one_line(tiny_authors, tiny_models):
    options = ("--chunk-rows", "16", "--layers", "1,2")
    other_size = _run(
        tiny_authors, tiny_models["llama"], *options, "--batching", "authors", "--batch-size", "3"
    )
    default = _run(tiny_authors, tiny_models["llama"], *options, "--batch-size", str(BATCH))
    for result, what in ((other_size, "batch size: stored 4 vs requested 3"), (default, "batching: stored")):
        assert result.exit_code == 2
        (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
        assert what in line and "--batching authors --batch-size 4" in line and "--overwrite" in line
        assert "Traceback" not in result.output
    again = _run(
        tiny_authors, tiny_models["llama"], *options, "--batching", "authors", "--batch-size", str(BATCH)
    )
    assert again.exit_code == 0, again.output  # the same values resume (nothing left to do)


def test_a_resume_without_batch_size_keeps_the_mode_default(tmp_path, tiny_models):
    options = ("--chunk-rows", "64", "--layers", "1")
    assert (
        _run(tmp_path / "s", tiny_models["llama"], *options, "--batching", "authors", limit=4).exit_code == 0
    )
    bigger = _run(tmp_path / "s", tiny_models["llama"], *options, "--batch-size", "16", limit=4)
    assert (
        bigger.exit_code == 2 and "batching: stored 'authors' vs requested 'length-sorted'" in bigger.output
    )
    s = store.open(tmp_path / "s")
    assert s.run(s.runs()[0]).manifest["batching"]["batch_size"] == 32


def test_attributions_with_authors_batching_are_refused(tmp_path, tiny_models):
    result = _run(tmp_path / "s", tiny_models["llama"], "--batching", "authors", "--attributions")
    assert result.exit_code == 2 and result.output.startswith("error: --attributions with --batching authors")
    assert len(result.output.strip().splitlines()) == 1


def test_attribute_resumes_with_the_runs_own_batch_size(tmp_path, tiny_models):
    options = ("--layers", "2", "--batch-size", "3", "--attributions", "--ig-steps", "4")
    assert _run(tmp_path / "s", tiny_models["llama"], *options, limit=3).exit_code == 0
    argv = ["attribute", "boolq/llama/fp32", "--store", str(tmp_path / "s"), "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(main, [*argv, "--ig-steps", "4"])
    assert result.exit_code == 0, result.output  # not refused for batch size 16 vs the stored 3
    refused = CliRunner().invoke(main, [*argv, "--ig-steps", "4", "--batch-size", "5"])
    assert refused.exit_code == 2 and "batch size: stored 3 vs requested 5" in refused.output


# --- the real SmolLM2 through real bitsandbytes LLM.int8 (the point of the mode) ---
SMOL_LIMIT, SMOL_CHUNK = 8, 64  # 3 units; LLM.int8 on a CPU runs ~4 tokens/s
SMOL_LAYERS = (1, 15, 30)


def _smol(path, bits: int, *options: str):
    args = ("--batch-size", str(BATCH), "--chunk-rows", str(SMOL_CHUNK), *options)
    result = _run(path, "smollm2-135m", *args, bits=bits, limit=SMOL_LIMIT)
    assert result.exit_code == 0, result.output
    s = store.open(path)
    return s.run(s.runs()[0])


def _smol_oracle(run):
    """The authors' loop on ``run``'s examples, int8 SmolLM2 loaded here (dequantized checkpoint)."""
    from qcache.extract.models.loading import dequantized_checkpoint
    from qcache.extract.models.registry import resolve_model

    ckpt = dequantized_checkpoint(resolve_model("smollm2-135m"))
    cfg = tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)  # what qcache records
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float16, quantization_config=cfg)
    tokenizer = tf.AutoTokenizer.from_pretrained(ckpt)
    modules = {n: f"model.layers.{n - 1}.mlp.act_fn" for n in SMOL_LAYERS}
    return authors_loop(model.eval(), tokenizer, _stored_ids(run), BATCH, modules), tokenizer


def _compare(run, ref, tokenizer) -> None:
    """Assert ``run`` holds exactly the authors' loop's activations and predictions."""
    layout = run.layout
    preds = run.predictions().to_pydict()
    assert preds["example_id"] == list(range(SMOL_LIMIT))
    labels = label_ids(tokenizer, run.label_words)
    acts = {n: run.activations(n).compute().astype(np.float32) for n in SMOL_LAYERS}
    for e, (probs, ref_acts) in enumerate(ref):
        s0, n_tok = int(layout.starts[e]), int(layout.lengths[e])
        for n in SMOL_LAYERS:  # the stored dtype (float16 for int8) holds the hook's values exactly
            np.testing.assert_array_equal(acts[n][s0 : s0 + n_tok], ref_acts[n], err_msg=f"example {e} L{n}")
        assert preds["top_token_id"][e] == int(probs.argmax())
        assert preds["top_token_prob"][e] == np.float32(probs.max())
        expected = np.array([probs[ids].sum(dtype=np.float32) for ids in labels], np.float32)
        # the same float32 probabilities summed over the same ids; only the order of summation may differ
        np.testing.assert_allclose(preds["label_prob"][e], expected, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def smol_int8(tmp_path_factory):
    """int8 runs under both batchings (same examples, batch size, units) and the authors' loop on them."""
    root = tmp_path_factory.mktemp("smol-int8")
    authors = _smol(root / "authors", 8, "--batching", "authors")
    default = _smol(root / "sorted", 8)
    ref, tokenizer = _smol_oracle(authors)
    return authors, default, ref, tokenizer


@pytest.mark.slow
def test_smollm2_int8_authors_batching_equals_the_authors_loop(smol_int8):
    authors, _, ref, tokenizer = smol_int8
    layout = authors.layout
    assert (layout.owner_units != layout.starts // layout.chunk_rows).any()  # an example straddles units
    _compare(authors, ref, tokenizer)


@pytest.mark.slow
def test_smollm2_default_batching_does_not_reproduce_the_authors_int8(smol_int8):
    _, run, ref, _ = smol_int8
    assert run.manifest["batching"]["mode"] == "length-sorted"
    assert _stored_ids(run) == _stored_ids(
        smol_int8[0]
    )  # same examples, tokens and units: only batching differs
    acts = run.activations(15).compute().astype(np.float32)
    worst = 0.0
    for e, (_probs, ref_acts) in enumerate(ref):
        s0 = int(run.layout.starts[e])
        want = ref_acts[15]
        got = acts[s0 : s0 + len(want)]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    print(f"length-sorted vs authors' int8, layer 15: worst relative difference {worst:.3g}")
    # other batch mates (and right padding with another pad id) change LLM.int8's outlier columns: far
    # more than fp16 rounding (~1e-3 of the largest value)
    assert worst > 1e-2, worst
