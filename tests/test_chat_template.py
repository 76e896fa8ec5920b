"""`--chat-template`: prompts as the user turn of the tokenizer's chat template (extract/inputs/prompting.py).

Oracles: the tokenizer's own ``apply_chat_template(..., add_generation_prompt=True)`` ids, a template
split by hand around the user turn, and the sha256 of the identity fields as the store hashed them before
the ``prompting`` record existed.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from qcache.extract.attrib.reattribute import config_from_manifest
from qcache.extract.inputs.datasets import DatasetRequest, load_dataset
from qcache.extract.inputs.prompting import Prompting
from qcache.extract.inputs.tokenize import tokenize
from qcache.extract.models.loading import dequantized_checkpoint
from qcache.extract.models.registry import resolve_model
from qcache.store.errors import DataError
from qcache.store.manifest import check_same_run, fingerprint
from tests.commands import extract_args
from tests.models import save_tiny_model

# A ChatML-like template for the tiny tokenizer (which has none); its markers are plain text there.
TINY_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[end]\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def smol_tokenizer():
    ckpt = dequantized_checkpoint(resolve_model("smollm2-135m"))
    return tf.AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def boolq_prompts():
    return load_dataset(DatasetRequest(name="boolq", limit=12)).prompts


def _template_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


@pytest.mark.parametrize("system", [None, "Answer True or False."])
def test_ids_equal_the_tokenizers_own_chat_template(smol_tokenizer, boolq_prompts, system):
    tok = tokenize(smol_tokenizer, boolq_prompts, 512, Prompting(True, system))
    assert not tok.n_truncated.any()
    for prompt, ids in zip(boolq_prompts, tok.ids, strict=True):
        turns = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        expected = _template_ids(smol_tokenizer, turns)
        assert ids.tolist() == expected  # one <|im_start|> per turn: no BOS added on top
        assert ids.tolist().count(smol_tokenizer.bos_token_id) == len(turns) + (system is None) + 1


def test_truncation_shortens_the_user_turn_and_keeps_the_template(smol_tokenizer, boolq_prompts):
    prompt = boolq_prompts[0]
    sentinel = "\x00"
    head, tail = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True
    ).split(sentinel)
    parts = [smol_tokenizer(t, add_special_tokens=False).input_ids for t in (head, prompt, tail)]
    full = _template_ids(smol_tokenizer, [{"role": "user", "content": prompt}])
    assert parts[0] + parts[1] + parts[2] == full  # ChatML's markers are token boundaries
    keep = 5
    max_length = len(parts[0]) + keep + len(parts[2])
    tok = tokenize(smol_tokenizer, [prompt], max_length, Prompting(True))
    assert tok.ids[0].tolist() == parts[0] + parts[1][-keep:] + parts[2]
    assert tok.n_truncated.tolist() == [len(parts[1]) - keep]
    with pytest.raises(DataError, match="template's own"):
        tokenize(smol_tokenizer, [prompt], len(parts[0]) + len(parts[2]), Prompting(True))


def _one_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    # a progress bar (weights loading) may precede the message
    lines = [ln for ln in result.output.splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama without a chat template, and a copy of it with one."""
    root = tmp_path_factory.mktemp("chat")
    plain = save_tiny_model("llama", root / "plain")
    chat = root / "chat"
    shutil.copytree(plain, chat)
    tokenizer = tf.AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = TINY_TEMPLATE
    tokenizer.save_pretrained(chat)
    return plain, chat


def test_a_tokenizer_without_a_template_is_refused_before_the_weights(tiny, tmp_path):
    plain, _ = tiny
    weightless = tmp_path / "weightless"
    shutil.copytree(plain, weightless)
    for f in weightless.glob("*.safetensors"):
        f.unlink()  # loading the weights would fail with another message
    plan = [
        "plan",
        "--model",
        str(weightless),
        "--bits",
        "32",
        "--chat-template",
        "--store",
        str(tmp_path / "s"),
    ]
    for args in (extract_args(weightless, tmp_path / "s", "--chat-template"), plan):
        line = _one_line(CliRunner().invoke(main, args))
        assert "has no chat template" in line and "--chat-template" in line, line
    assert not (tmp_path / "s" / "runs").exists()


def test_system_prompt_needs_the_chat_template(tiny, tmp_path):
    line = _one_line(CliRunner().invoke(main, extract_args(tiny[1], tmp_path / "s", "--system-prompt", "Hi")))
    assert "--system-prompt" in line and "--chat-template" in line, line


def test_sequence_scoring_with_the_chat_template_is_refused(tiny, tmp_path):
    args = extract_args(tiny[1], tmp_path / "s", "--chat-template", "--label-scoring", "sequence")
    line = _one_line(CliRunner().invoke(main, args))
    assert "--label-scoring sequence" in line and "--chat-template" in line, line
    assert not (tmp_path / "s").exists()


def test_manifest_records_the_prompting_and_a_different_one_is_refused(tiny, tmp_path):
    _, chat = tiny
    path = tmp_path / "s"
    run = CliRunner().invoke(main, extract_args(chat, path, "--chat-template", limit=2))
    assert run.exit_code == 0, run.output
    plain = CliRunner().invoke(main, extract_args(chat, path, limit=2))
    assert plain.exit_code == 0, plain.output
    s = store.open(path)
    assert sorted(str(k).split("/")[0] for k in s.runs()) == ["boolq", "boolq-chat"]
    chat_run, plain_run = (s.run(f"{d}/{chat.name}/fp32") for d in ("boolq-chat", "boolq"))
    prompts = load_dataset(DatasetRequest(name="boolq", limit=2)).prompts
    tokenizer = tf.AutoTokenizer.from_pretrained(chat)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], tokenize=False, add_generation_prompt=True
    )
    record = chat_run.manifest["prompting"]
    assert record["chat_template"] is True and record["system_prompt"] is None
    assert record["example"] == rendered == f"[user]{prompts[0]}[end]\n[assistant]"
    assert record["template_sha256"] == hashlib.sha256(TINY_TEMPLATE.encode()).hexdigest()
    assert plain_run.manifest["prompting"] == {"chat_template": False}
    # each run stores the exact text it tokenized: the rendering under the template, the prompt without
    assert chat_run.examples()["prompt"].to_pylist()[0] == rendered
    assert plain_run.examples()["prompt"].to_pylist() == prompts
    # the stored tokens are the template's; the plain run's are the tokenizer's with its BOS
    n0 = int(chat_run.layout.lengths[0])
    assert (
        chat_run.token_index().column("token_id").to_numpy()[:n0].tolist()
        == tokenizer(rendered, add_special_tokens=False).input_ids
    )
    # `qcache attribute` rebuilds a run's arguments from its manifest: the chat run stays the chat run
    assert config_from_manifest(path, chat_run.manifest, str(chat)).prompting == Prompting(True)
    assert config_from_manifest(path, plain_run.manifest, str(chat)).prompting == Prompting()
    # resuming with another system prompt mixes two experiments: refused, naming the record
    again = CliRunner().invoke(
        main, extract_args(chat, path, "--chat-template", "--system-prompt", "Be brief.", limit=2)
    )
    line = _one_line(again)
    assert "prompting" in line and "dataset" not in line and "--overwrite" in line, line
    # the line names the key that differs, with both values, rather than two cut-off records
    assert 'prompting.system_prompt: stored null vs requested "Be brief."' in line, line


def test_runs_stored_before_the_prompting_record_keep_their_fingerprint():
    old = {"model_source": "x", "quant_config": {"quant": "fp32"}, "dtype": "float32", "layers": [1]}
    old |= {"taps": ["act"], "dataset": {"source": "d"}, "max_length": 512, "chunk_rows": 64}
    old |= {"attributions": None}
    # the hash as the store computed it before `prompting` joined the identity fields
    before = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert fingerprint(old) == before
    assert fingerprint(old | {"prompting": {"chat_template": False}}) == before
    check_same_run(old, old | {"prompting": {"chat_template": False}}, "r")  # resumes
    assert fingerprint(old | {"prompting": {"chat_template": True}}) != before


@pytest.mark.slow
def test_smollm2_chat_predictions_match_a_direct_forward(tmp_path, smol_tokenizer):
    path = tmp_path / "s"
    args = extract_args("smollm2-135m", path, "--chat-template", "--layers", "1", bits=32, limit=4)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    run = store.open(path).run("boolq-chat/smollm2-135m/fp32")
    model = tf.AutoModelForCausalLM.from_pretrained(
        dequantized_checkpoint(resolve_model("smollm2-135m")), dtype=torch.float32
    ).eval()
    prompts = load_dataset(DatasetRequest(name="boolq", limit=4)).prompts
    preds = run.predictions().to_pydict()
    label_ids = run.manifest["readout"]["label_token_ids"]
    for e, prompt in enumerate(prompts):
        ids = _template_ids(smol_tokenizer, [{"role": "user", "content": prompt}])
        s0 = int(run.layout.starts[e])
        assert run.token_index().column("token_id").to_numpy()[s0 : s0 + len(ids)].tolist() == ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        probs = torch.softmax(logits.double(), -1).numpy()
        expected = [probs[label_ids[w]].sum() for w in run.label_words]
        np.testing.assert_allclose(preds["label_prob"][e], expected, rtol=1e-3, atol=1e-6)
        assert preds["top_token_id"][e] == int(np.argmax(probs))
