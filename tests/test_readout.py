"""Label scoring: first-token refusals (from the tokenizer alone) and ``--label-scoring sequence``.

The sequence oracle is lm-evaluation-harness's loglikelihood written out here: the continuation is
``" " + word`` with the prompt's trailing whitespace moved into it, its tokens are
``tokens(context + continuation)[len(tokens(context)):]``, and its score is the sum of the log-softmax
probabilities of a plain, unpadded transformers forward over the context and continuation tokens.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from qcache.store.manifest import check_same_run, fingerprint
from tests.commands import extract_args
from tests.oracle import hooked_forward

RATINGS = [  # text (prompt, with "Rating:" and sometimes a trailing space), gold
    ("Review: a wonderful film, I loved every minute.\nRating:", "10"),
    ("Review: dull and far too long.\nRating: ", "1"),
    ("Review: fine, nothing special.\nRating:", "5"),
    ("Review: the best thing I saw this year.\nRating:  ", "10"),
    ("Review: boring plot but good actors.\nRating:", "5"),
    ("Review: a waste of time.\nRating:", "1"),
]


def _ratings_csv(tmp_path, rows=RATINGS):
    path = tmp_path / "ratings.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def _sequence_logprob(model, tokenizer, prompt: str, word: str) -> float:
    """lm-eval loglikelihood of ``" " + word`` after ``prompt``, by a plain forward (the oracle)."""
    context = prompt.rstrip()
    continuation = prompt[len(context) :] + " " + word
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(tokenizer(context, add_special_tokens=False).input_ids) :]
    ctx = tokenizer(context).input_ids  # the prompt as qcache forwards it (special tokens included)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def _check_against_oracle(run, model, tokenizer, prompts, layer_path):
    preds = run.predictions().to_pydict()
    words = run.label_words
    assert set(preds["label_scoring"]) == {"sequence"}
    assert run.manifest["label_scoring"] == "sequence" and run.manifest["readout"]["scoring"] == "sequence"
    acts = run.activations(run.manifest["layers"][0]).compute().astype(np.float32)
    for e, prompt in enumerate(prompts):
        ref = np.array([_sequence_logprob(model, tokenizer, prompt, w) for w in words])
        # fp32, a padded batch against one unpadded example: ~2e-5 apart in log-probability
        np.testing.assert_allclose(np.log(preds["label_prob"][e]), ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(preds["label_prob"][e], np.exp(ref), atol=1e-5, rtol=1e-5)
        norm = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
        np.testing.assert_allclose(preds["label_prob_norm"][e], norm, atol=1e-5)
        assert preds["pred_label"][e] == int(np.argmax(ref))
        assert preds["confidence"][e] == pytest.approx(norm.max(), abs=1e-5)
        assert preds["correct"][e] == (preds["pred_label"][e] == preds["gold"][e])
        # the extra scoring forwards left the cached activations alone: they are the prompt's own
        ids = np.asarray(tokenizer(prompt).input_ids)
        tap, probs = hooked_forward(model, layer_path, ids)
        s0 = int(run.layout.starts[e])
        np.testing.assert_allclose(acts[s0 : s0 + len(ids)], tap, atol=1e-4 * np.abs(tap).max())
        assert preds["top_token_id"][e] == int(np.argmax(probs))


def test_sequence_scoring_matches_a_direct_forward_tiny(tmp_path, tiny_models):
    """A tiny llama: 'A B' takes two tokens, and prompts ending in a space move it into the continuation."""
    from qcache.extract.inputs.datasets import DatasetRequest, load_dataset

    rows = [(f"Question {i}\nAnswer:{' ' * (i % 2)}", w) for i, w in enumerate(["True", "False", "A B"] * 2)]
    path = _ratings_csv(tmp_path, rows)
    args = ("--dataset", str(path), "--labels", "True,False,A B", "--layers", "1", "--batch-size", "4")
    args += ("--label-scoring", "sequence", "--chunk-rows", "8")  # examples straddle units
    result = CliRunner().invoke(main, extract_args(tiny_models["llama"], tmp_path / "s", *args, limit=6))
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "s")
    run = s.run(s.runs()[0])
    assert run.layout.n_units > 1
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_models["llama"])
    prompts = load_dataset(DatasetRequest(name=str(path), labels=("True", "False", "A B"), limit=6)).prompts
    _check_against_oracle(run, model, tokenizer, prompts, "model.layers.0.mlp.act_fn")


def test_resuming_with_another_scoring_is_refused(tmp_path, tiny_models):
    first = extract_args(tiny_models["llama"], tmp_path / "s", "--layers", "1", limit=2)
    assert CliRunner().invoke(main, first).exit_code == 0
    again = CliRunner().invoke(main, [*first, "--label-scoring", "sequence"])
    assert again.exit_code == 2 and "Traceback" not in again.output
    line = again.output.strip().splitlines()[-1]  # after transformers' weight-loading bar
    assert line.startswith("error:") and 'label_scoring: stored "first-token" vs requested "sequence"' in line


def test_runs_stored_before_label_scoring_keep_their_identity():
    old = {"model_source": "m", "dataset": {"name": "d"}, "layers": [1], "taps": ["act"]}
    new = dict(old, label_scoring="first-token")
    assert fingerprint(old) == fingerprint(new)  # verify and resume of old stores are unchanged
    check_same_run(old, new, "d/m/fp32")  # no RunMismatch
    assert fingerprint(dict(old, label_scoring="sequence")) != fingerprint(old)


@pytest.fixture(scope="module")
def smol_tokenizer():
    from qcache.extract.models.loading import dequantized_checkpoint
    from qcache.extract.models.registry import resolve_model

    return tf.AutoTokenizer.from_pretrained(dequantized_checkpoint(resolve_model("smollm2-135m")))


@pytest.mark.slow
def test_first_token_collision_rule_on_smollm2(smol_tokenizer):
    from qcache.extract.run.readout import label_tokens
    from qcache.extract.run.scoring import check_label_scoring
    from qcache.store.errors import InvalidOption

    tok = smol_tokenizer

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    assert ids(" 1") == [ids(" ")[0], ids("1")[0]]  # SmolLM2 writes " 1" as ' ' + '1'
    lt = label_tokens(tok, ("1", "5", "10"))
    assert lt.ids[0] == tuple(ids("1")) and lt.ids[2] == ()  # '10' is no single token; ' ' counts for none
    with pytest.raises(InvalidOption) as err:
        check_label_scoring(tok, ("1", "5", "10"), "first-token", None)
    msg = str(err.value)
    assert "'10' is no single token in any spelling" in msg and "label '1' whole" in msg
    assert "--label-scoring sequence" in msg
    check_label_scoring(tok, ("1", "5", "10"), "sequence", None)  # sequence scoring reads them
    with pytest.raises(InvalidOption, match=r"--ig-target gold .*'10'"):
        check_label_scoring(tok, ("1", "5", "10"), "sequence", "gold")
    check_label_scoring(tok, ("False", "True"), "first-token", "gold")
    ft = label_tokens(tok, ("False", "True"))
    # only spellings that are one token count: "FALSE" is 'F' + 'ALSE', so 'F' (a fragment) is no label's
    assert len(ids("FALSE")) > 1 and ids("FALSE")[0] not in ft.ids[0] and not ft.collisions
    assert set(ft.ids[0]) == {ids(t)[0] for t in ("False", " False", "false", " false") if len(ids(t)) == 1}
    # a fragment never counts for a label, and never takes a token from one: 'C' is label 'C' whole
    cc = label_tokens(tok, ("C", "category"))
    assert ids("C")[0] in cc.ids[0] and not set(cc.ids[1]) & {ids("CATEGORY")[0], ids(" CATEGORY")[0]}
    assert not cc.dropped
    # "no" and "No": each one's case variants are the other's canonical spellings, so nothing is left
    with pytest.raises(InvalidOption, match="'no' and 'No' have no token of their own"):
        check_label_scoring(tok, ("no", "No"), "first-token", None)
    # the shipped HellaSwag's digit labels are single tokens without the space
    check_label_scoring(tok, ("0", "1", "2", "3"), "first-token", None)


@pytest.mark.slow
def test_cli_refuses_inseparable_first_tokens_without_loading_weights(tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_config", no_weights)
    path = _ratings_csv(tmp_path)
    args = extract_args("smollm2-135m", tmp_path / "st", "--dataset", str(path), "--labels", "1,5,10")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.output, result.exception)
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "'10' is no single token" in line and "label '1'" in line and "--label-scoring sequence" in line
    assert not (tmp_path / "st").exists()  # the store was not even created
    gold = CliRunner().invoke(
        main, [*args, "--label-scoring", "sequence", "--attributions", "--ig-target", "gold"]
    )
    assert gold.exit_code == 2 and "--ig-target gold" in gold.output and "'10'" in gold.output
    assert not (tmp_path / "st").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["boolq", "ratings"])
def test_sequence_scoring_matches_a_direct_forward_smollm2(tmp_path, dataset):
    from qcache.extract.inputs.datasets import DatasetRequest, load_dataset
    from qcache.extract.models.loading import dequantized_checkpoint
    from qcache.extract.models.registry import resolve_model

    if dataset == "boolq":
        request, args = DatasetRequest(name="boolq", limit=6), ()
    else:
        path = _ratings_csv(tmp_path)
        request = DatasetRequest(name=str(path), labels=("1", "5", "10"), limit=6)
        args = ("--dataset", str(path), "--labels", "1,5,10")
    args += ("--label-scoring", "sequence", "--layers", "1", "--batch-size", "4")
    result = CliRunner().invoke(main, extract_args("smollm2-135m", tmp_path / "st", *args, limit=6))
    assert result.exit_code == 0, result.output
    s = store.open(tmp_path / "st")
    run = s.run(s.runs()[0])
    readout = run.manifest["readout"]
    if dataset == "ratings":
        assert [216, 33, 32] in readout["continuation_token_ids"]["10"], json.dumps(readout)
        assert readout["n_examples_context_stripped"] == 2
    ckpt = dequantized_checkpoint(resolve_model("smollm2-135m"))
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(ckpt)
    prompts = load_dataset(request).prompts
    _check_against_oracle(run, model, tokenizer, prompts, "model.layers.0.mlp.act_fn")
