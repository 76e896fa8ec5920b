"""Token strings (extract/inputs/token_text.py) against the tokenizers' own pieces and decoders.

The oracle never calls qcache's conversion: it unescapes the documented convention with its own code
(``unescape`` below) and compares with ``tokenizer.decode`` / ``convert_ids_to_tokens``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from qcache.extract.inputs.token_text import token_strings
from qcache.extract.run.readout import Readout
from qcache.extract.run.scoring import SequenceReadout
from tests.models import tiny_tokenizer
from tests.token_oracle import unescape


@pytest.fixture(scope="module")
def byte_level() -> tf.PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece() -> tf.PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: "▁" for spaces, byte fallback, a decoder that strips the first space."""
    words = ["▁", "▁Hello", "▁the", "▁world", *"Helothwrda,\\<0xA>"]
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *dict.fromkeys(words)]
    vocab = [(p, 0.0 if i < 3 else -1.0 if len(p) > 1 else -6.0) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _single(tokenizer, text: str) -> int:
    (i,) = tokenizer(text, add_special_tokens=False).input_ids
    return int(i)


def test_newline_space_and_tab_tokens_are_distinct_and_visible(byte_level):
    nl, sp, tab = (_single(byte_level, t) for t in ("\n", " ", "\t"))
    assert [byte_level.decode([i]).strip() for i in (nl, sp)] == ["", ""]  # what top_token used to show
    assert list(token_strings(byte_level, [nl, sp, tab])) == ["\\n", " ", "\\t"]


def test_every_byte_level_entry_unescapes_to_its_bytes_and_no_two_look_alike(byte_level):
    ids = list(range(len(byte_level)))
    shown = token_strings(byte_level, ids)
    assert len(set(shown)) == len(ids)  # unambiguous over the whole vocabulary
    special = set(byte_level.all_special_ids)
    partial = 0
    for i, s in zip(ids, shown, strict=True):
        text = byte_level.decode([i], clean_up_tokenization_spaces=False)
        if i in special:
            assert s == byte_level.convert_ids_to_tokens(i)
        elif "\ufffd" in text:  # part of a character: its bytes are shown, and they are the piece's bytes
            partial += 1
            assert re.fullmatch(r"(<0x[0-9A-F]{2}>)+", s), s
        else:
            assert unescape(s) == text.encode(), (i, s, text)
    assert partial > 0  # the tiny vocabulary has such bytes (its alphabet is all 256 bytes)


def test_sequences_round_trip_through_their_token_strings(byte_level, sentencepiece):
    text = "Hello the\nworld é  a\t\\ <0x0A> ☃,\u00a0end"
    for tok in (byte_level, sentencepiece):
        ids = tok(text, add_special_tokens=False).input_ids
        joined = b"".join(unescape(s) for s in token_strings(tok, ids))
        # the text the tokens write after another token: a SentencePiece decoder strips the space that
        # starts a sequence, which the token strings keep
        anchor = tok.convert_tokens_to_ids("a")
        after = tok.decode([anchor, *ids])[len(tok.decode([anchor])) :]
        assert joined == after.encode(), tok.convert_ids_to_tokens(ids)
    assert after == " " + tok.decode(ids)  # (this toy tokenizer reads text "<0x0A>" as its byte token)


def test_lookalikes_of_byte_tokens_and_invisible_characters_are_escaped():
    # a byte-level vocabulary whose merges make whole tokens of "<0x0A>", a no-break space and a backslash
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["<0x0A>", "\u00a0", "\\", "\u200b"] * 50, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    for text, shown in (("<0x0A>", "\\<0x0A>"), ("\u00a0", "\\xa0"), ("\\", "\\\\"), ("\u200b", "\\u200b")):
        ids = fast(text, add_special_tokens=False).input_ids
        assert len(ids) == 1 and fast.decode(ids) == text
        assert list(token_strings(fast, ids)) == [shown] and unescape(shown) == text.encode()
    everything = token_strings(fast, range(len(fast)))
    assert len(set(everything)) == len(fast)


def test_sentencepiece_keeps_leading_spaces_and_shows_byte_tokens(sentencepiece):
    tok = sentencepiece
    ids = tok("Hello the\nworld é", add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    shown = list(token_strings(tok, ids))
    anchor = tok.convert_tokens_to_ids("a")
    for i, piece, s in zip(ids, pieces, shown, strict=True):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            assert s == piece  # byte-fallback tokens as their vocabulary piece: "\n" is <0x0A>
        else:  # the text the decoder writes after another token (it strips the first space of a sequence)
            assert s == tok.decode([anchor, i])[len(tok.decode([anchor])) :]
    assert shown[:3] == [" Hello", " the", "<0x0A>"]
    assert tok.decode([ids[0]]) == "Hello"  # decoding alone (TransformerLens' way) loses the space
    everything = token_strings(tok, range(len(tok)))
    assert len(set(everything)) == len(tok)


def test_top_token_is_shown_unambiguously_and_correct_vocab_keeps_the_authors_rule(byte_level):
    nl, sp = _single(byte_level, "\n"), _single(byte_level, " ")
    true = _single(byte_level, " True")
    readout = Readout(byte_level, ("False", "True"), torch.device("cpu"))
    parts = {
        "label_prob": np.array([[0.1, 0.2]] * 3, np.float32),
        "norm": np.array([[1 / 3, 2 / 3]] * 3, np.float32),
        "top_prob": np.array([0.5, 0.4, 0.3], np.float32),
        "top_id": np.array([nl, sp, true]),
    }
    cols = readout.host_columns(parts, np.array([1, 1, 1]))
    assert list(cols["top_token"]) == ["\\n", " ", " True"]
    # the authors read "correct" as the gold word inside decode(top).strip(), case-insensitively
    assert list(cols["correct_vocab"]) == [False, False, True]


def test_sequence_scoring_records_each_labels_continuation_ids(byte_level):
    from qcache.extract.inputs.tokenize import tokenize

    labels = ("yes please", "no")  # not single tokens: first-token ids leave them empty
    prompts = ["Is the sky blue?\nAnswer:", "True or False only.\nAnswer:"]
    tok = tokenize(byte_level, prompts, 64)
    manifest = SequenceReadout(byte_level, labels, torch.device("cpu"), prompts, tok, 64).manifest()
    for w in labels:
        # lm-evaluation-harness: tokens(context + " " + word) after tokens(context), no special tokens
        whole = byte_level(prompts[0] + " " + w, add_special_tokens=False).input_ids
        expected = whole[len(byte_level(prompts[0], add_special_tokens=False).input_ids) :]
        assert manifest["label_token_ids"][w] == expected and len(expected) >= 1
        assert expected in manifest["continuation_token_ids"][w]
    assert manifest["first_token_ids"]["yes please"] == []  # what label_token_ids held before


@pytest.mark.slow
def test_every_smollm2_entry_is_distinct_and_unescapes_to_its_decoding():
    from qcache.extract.models.loading import load_tokenizer
    from qcache.extract.models.registry import resolve_model

    tok, _ = load_tokenizer(resolve_model("smollm2-135m"))
    ids = list(range(len(tok)))
    shown = token_strings(tok, ids)
    assert len(set(shown)) == len(ids)
    special = set(tok.all_special_ids)
    for i, s in zip(ids, shown, strict=True):
        text = tok.decode([i], clean_up_tokenization_spaces=False)
        if i not in special and "\ufffd" not in text:
            assert unescape(s) == text.encode(), (i, s, text)
    nl, sp = (_single(tok, t) for t in ("\n", " "))
    assert list(token_strings(tok, [nl, sp])) == ["\\n", " "]
