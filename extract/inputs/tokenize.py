"""Tokenize a dataset once, before any forward pass, so every example's rows are known."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qcache.extract.inputs.prompting import Prompting, chat_ids
from qcache.store.errors import DataError


@dataclass(frozen=True)
class Tokenized:
    ids: list[np.ndarray]  # per example, (tokens,) int32 after truncation
    n_truncated: np.ndarray  # (examples,) tokens dropped per example
    texts: list[str] | None = None  # per example, the exact text that was encoded (before truncation)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int32)


def tokenize(
    tokenizer: Any, prompts: list[str], max_length: int, prompting: Prompting | None = None
) -> Tokenized:
    """Tokenize with special tokens; prompts over ``max_length`` lose tokens from the front.

    The front goes rather than the end because the end holds the instruction's ``Answer:`` that the
    prediction is read after; a leading BOS token is kept. Under ``prompting.chat_template`` each prompt
    is the user turn of the chat template and loses tokens from the front of that turn (prompting.py).
    """
    if max_length < 2:
        raise DataError(f"--max-length {max_length} is too small: use at least 2")
    if prompting is not None and prompting.chat_template:
        texts = [prompting.render(tokenizer, p) for p in prompts]
        pairs = [
            chat_ids(tokenizer, prompting, p, max_length, text)
            for p, text in zip(prompts, texts, strict=True)
        ]
        for i, (seq, _) in enumerate(pairs):
            if not seq:
                raise DataError(f"example {i} tokenizes to nothing under the chat template")
        return Tokenized(
            [np.asarray(seq, dtype=np.int32) for seq, _ in pairs],
            np.array([n for _, n in pairs], dtype=np.int32),
            texts,
        )
    encoded = tokenizer(prompts, add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id
    ids, dropped = [], np.zeros(len(prompts), dtype=np.int32)
    for i, seq in enumerate(encoded):
        if not seq:
            raise DataError(f"example {i} tokenizes to nothing (empty prompt?): remove it from the dataset")
        if len(seq) > max_length:
            keep_bos = 1 if bos is not None and seq[0] == bos else 0
            dropped[i] = len(seq) - max_length
            seq = seq[:keep_bos] + seq[len(seq) - (max_length - keep_bos) :]
        ids.append(np.asarray(seq, dtype=np.int32))
    return Tokenized(ids, dropped, list(prompts))
