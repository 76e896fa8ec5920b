"""Read the answer from the first next-token distribution (no free generation).

Per example we keep both readings the study needs: the paper's (probabilities of the label words,
renormalized over the labels) and the authors' code's (the full-vocabulary argmax token, its probability,
and "correct" when the gold word occurs in that token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class LabelTokens:
    """First-token ids of every spelling variant of every label word."""

    labels: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]  # per label, unique first-token ids

    def manifest(self) -> dict[str, Any]:
        return {"label_token_ids": {w: list(i) for w, i in zip(self.labels, self.ids, strict=True)}}


def label_tokens(tokenizer: Any, labels: tuple[str, ...]) -> LabelTokens:
    """Collect first tokens of ``w``, `` w``, lower/upper-case variants; an id two labels share is dropped."""
    per_label: list[set[int]] = []
    for word in labels:
        ids: set[int] = set()
        for variant in {word, word.lower(), word.capitalize(), word.upper()}:
            for text in (variant, " " + variant):
                enc = tokenizer(text, add_special_tokens=False).input_ids
                if enc:
                    ids.add(int(enc[0]))
        per_label.append(ids)
    shared = {
        i for a in range(len(labels)) for b in range(a + 1, len(labels)) for i in per_label[a] & per_label[b]
    }
    return LabelTokens(labels, tuple(tuple(sorted(s - shared)) for s in per_label))


class Readout:
    """Turns last-position logits into the prediction columns of the store."""

    def __init__(self, tokenizer: Any, labels: tuple[str, ...], device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.tokens = label_tokens(tokenizer, labels)
        self.labels = labels
        flat = [i for ids in self.tokens.ids for i in ids]
        owner = [k for k, ids in enumerate(self.tokens.ids) for _ in ids]
        self._ids = torch.tensor(flat, dtype=torch.long, device=device)
        self._owner = torch.tensor(owner, dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor, gold: np.ndarray) -> dict[str, np.ndarray]:
        """``logits`` (examples, vocab) at each example's last real token; ``gold`` label indices."""
        probs = torch.softmax(logits.float(), dim=-1)  # (examples, vocab)
        label_prob = torch.zeros(probs.shape[0], len(self.labels), device=probs.device)
        label_prob.index_add_(1, self._owner, probs[:, self._ids])  # (examples, labels)
        norm = label_prob / label_prob.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        top_prob, top_id = probs.max(dim=-1)
        lp, ln = label_prob.cpu().numpy(), norm.cpu().numpy()
        pred = ln.argmax(axis=1).astype(np.int16)
        top_ids = top_id.cpu().numpy().astype(np.int32)
        top_text = [self.tokenizer.decode([int(t)]).strip() for t in top_ids]
        gold_words = [self.labels[g].strip().lower() for g in gold]
        return {
            "gold": gold.astype(np.int16),
            "label_prob": lp.astype(np.float32),
            "label_prob_norm": ln.astype(np.float32),
            "pred_label": pred,
            "confidence": ln.max(axis=1).astype(np.float32),
            "correct": pred == gold,
            "top_token_id": top_ids,
            "top_token": np.array(top_text, dtype=object),
            "top_token_prob": top_prob.cpu().numpy().astype(np.float32),
            "correct_vocab": np.array([g in t.lower() for g, t in zip(gold_words, top_text, strict=True)]),
        }
