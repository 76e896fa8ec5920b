"""Read the answer from the first next-token distribution (no generation): ``--label-scoring first-token``.

Per example we keep both readings the study needs: the paper's (probabilities of the label words,
renormalized over the labels) and the authors' code's (the full-vocabulary argmax token, its probability,
and "correct" when the gold word occurs in that token). The whole-sequence reading of lm-evaluation-harness
(``--label-scoring sequence``) is in scoring.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qcache.extract.inputs.token_text import vocab_strings
from qcache.store.errors import InvalidOption

SCORINGS = ("first-token", "sequence")


@dataclass(frozen=True)
class LabelTokens:
    """The tokens that spell each label word whole, for first-token scoring.

    A spelling counts only when it is one token: ``w``, ``" " + w`` and their lower/capitalized/upper-case
    variants, each kept when the tokenizer writes it as a single token. The first token of a longer
    spelling is a fragment shared with other words (SmolLM2 writes ``"FALSE"`` as ``'F' + 'ALSE'`` and
    ``" 10"`` as ``' ' + '1' + '0'``), so its probability is not the label's.

    ``canonical`` holds, per label, the single tokens of the word as given and of ``" " + word``; ``ids`` the
    label's single-token ids after dropping ``dropped`` (ids two labels share); ``collisions`` the ids that
    the canonical spellings of two or more labels share, each with those labels; ``fragments`` per label the
    first tokens of its canonical spellings that are longer than one token (named in refusals).
    """

    labels: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]  # per label, unique single-token ids
    canonical: tuple[tuple[int, ...], ...] = ()
    dropped: tuple[int, ...] = ()
    collisions: tuple[tuple[int, tuple[str, ...]], ...] = ()
    fragments: tuple[tuple[int, ...], ...] = ()

    def manifest(self) -> dict[str, Any]:
        return {
            "label_token_ids": {w: list(i) for w, i in zip(self.labels, self.ids, strict=True)},
            "dropped_shared_ids": list(self.dropped),
            "rule": "single-token spellings of w, ' w' and their case variants; ids two labels share dropped",
        }


def label_tokens(tokenizer: Any, labels: tuple[str, ...]) -> LabelTokens:
    """The single-token spellings of each label (``w``, ``" " + w``, lower/capitalized/upper-case variants).

    An id two labels share is dropped from both; when canonical spellings share it, it is also listed in
    ``collisions``. Needs only the tokenizer, so it runs before any weights are read.
    """
    canonical: list[set[int]] = []
    per_label: list[set[int]] = []
    fragments: list[tuple[int, ...]] = []
    for word in labels:
        variants = {word, word.lower(), word.capitalize(), word.upper()}
        # spelling -> its ids, tokenized once, without special tokens
        enc = {t: tokenizer(t, add_special_tokens=False).input_ids for v in variants for t in (v, " " + v)}
        canon = [enc[word], enc[" " + word]]
        canonical.append({int(e[0]) for e in canon if len(e) == 1})
        per_label.append({int(e[0]) for e in enc.values() if len(e) == 1})
        fragments.append(tuple(sorted({int(e[0]) for e in canon if len(e) > 1})))
    n = len(labels)
    shared = {i for a in range(n) for b in range(a + 1, n) for i in per_label[a] & per_label[b]}
    clashing = sorted({i for a in range(n) for b in range(a + 1, n) for i in canonical[a] & canonical[b]})
    collisions = tuple(
        (i, tuple(w for w, c in zip(labels, canonical, strict=True) if i in c)) for i in clashing
    )
    return LabelTokens(
        labels,
        tuple(tuple(sorted(s - shared)) for s in per_label),
        tuple(tuple(sorted(c)) for c in canonical),
        tuple(sorted(shared)),
        collisions,
        tuple(fragments),
    )


def separation_problem(tokens: LabelTokens, tokenizer: Any) -> str | None:
    """Why first-token scoring cannot tell ``tokens.labels`` apart, or ``None`` when it can.

    The rule: the canonical spellings (``w`` and ``" " + w``) of two labels are the same single token; or a
    label is no single token in any spelling (its first token is a fragment of other words); or it keeps no
    single-token id of its own once the ids two labels share are dropped.
    """
    parts = [
        f"{_join(words)} {'both' if len(words) == 2 else 'all'} are token {tokenizer.decode([i])!r} (id {i})"
        for i, words in tokens.collisions
    ]
    colliding = {w for _, words in tokens.collisions for w in words}
    owner = {i: w for w, canon in zip(tokens.labels, tokens.canonical, strict=True) for i in canon}
    no_own = []
    for w, ids, canon, frags in zip(
        tokens.labels, tokens.ids, tokens.canonical, tokens.fragments, strict=True
    ):
        if ids or w in colliding:
            continue
        if canon:  # its single-token spellings are all other labels' case variants too
            no_own.append(w)
            continue
        starts = ", ".join(repr(tokenizer.decode([i])) for i in frags)
        whole = [f"{tokenizer.decode([i])!r} is label {owner[i]!r} whole" for i in frags if i in owner]
        parts.append(
            f"{w!r} is no single token in any spelling: its spellings start with {starts}"
            + (f" ({'; '.join(whole)})" if whole else "")
        )
    if no_own:
        have = "has no token of its own" if len(no_own) == 1 else "have no token of their own"
        parts.append(f"{_join(no_own)} {have}")
    return "; ".join(parts) or None


def check_separable(tokens: LabelTokens, tokenizer: Any, what: str, fix: str) -> None:
    """Raise ``InvalidOption`` naming the label words whose first tokens cannot separate them."""
    problem = separation_problem(tokens, tokenizer)
    if problem is not None:
        raise InvalidOption(f"{what} cannot tell the labels apart by their first token: {problem}; {fix}")


def _join(words: tuple[str, ...] | list[str]) -> str:
    quoted = [repr(w) for w in words]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


class Readout:
    """Turns last-position logits into the prediction columns of the store (first-token scoring)."""

    scoring = "first-token"

    def __init__(self, tokenizer: Any, labels: tuple[str, ...], device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.tokens = label_tokens(tokenizer, labels)
        self.labels = labels
        flat = [i for ids in self.tokens.ids for i in ids]
        owner = [k for k, ids in enumerate(self.tokens.ids) for _ in ids]
        self._ids = torch.tensor(flat, dtype=torch.long, device=device)
        self._owner = torch.tensor(owner, dtype=torch.long, device=device)
        self._text: dict[int, tuple[str, str]] = {}  # id -> (store string, decoded text stripped)

    def _top_text(self, ids: np.ndarray) -> tuple[list[str], list[str]]:
        """Per id: its string in the store's convention (token_text.py) and the authors' reading of it,
        ``decode([id]).strip()``, which ``correct_vocab`` searches for the gold word."""
        new = sorted({int(t) for t in ids} - self._text.keys())
        if new:
            shown = vocab_strings(self.tokenizer, new)
            for t in new:
                self._text[t] = (shown[t], self.tokenizer.decode([t]).strip())
        pairs = [self._text[int(t)] for t in ids]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def manifest(self) -> dict[str, Any]:
        return {"scoring": self.scoring, **self.tokens.manifest()}

    def __call__(
        self, logits: torch.Tensor, gold: np.ndarray, examples: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """``logits`` (examples, vocab) at each example's last real token; ``gold`` label indices."""
        return self.host_columns(_to_host(self.device_parts(logits)), gold)

    def device_parts(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors the columns are read from, computed where ``logits`` are, with no host sync:
        ``label_prob``, ``norm`` (examples, labels), ``top_prob``, ``top_id`` (examples,). The extraction
        loop copies them to the host behind the next batch's forward (``host_columns`` finishes)."""
        probs = torch.softmax(logits.float(), dim=-1)  # (examples, vocab)
        label_prob = torch.zeros(probs.shape[0], len(self.labels), device=probs.device)
        label_prob.index_add_(1, self._owner, probs[:, self._ids])  # (examples, labels)
        return self._parts(probs, label_prob)

    def _parts(
        self, probs: torch.Tensor, label_prob: torch.Tensor, norm: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if norm is None:
            norm = label_prob / label_prob.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        top_prob, top_id = probs.max(dim=-1)
        return {"label_prob": label_prob, "norm": norm, "top_prob": top_prob, "top_id": top_id}

    def columns(
        self,
        probs: torch.Tensor,
        label_prob: torch.Tensor,
        gold: np.ndarray,
        norm: torch.Tensor | None = None,
    ) -> dict[str, np.ndarray]:
        """The prediction columns from the full ``probs`` (examples, vocab), ``label_prob`` (examples, labels)
        and, when not ``label_prob`` renormalized over the labels, ``norm`` (examples, labels)."""
        return self.host_columns(_to_host(self._parts(probs, label_prob, norm)), gold)

    def host_columns(self, parts: dict[str, np.ndarray], gold: np.ndarray) -> dict[str, np.ndarray]:
        """The prediction columns from ``device_parts`` copied to the host (numpy)."""
        lp, ln = parts["label_prob"], parts["norm"]
        pred = ln.argmax(axis=1).astype(np.int16)
        top_ids = parts["top_id"].astype(np.int32)
        top_shown, top_text = self._top_text(top_ids)
        gold_words = [self.labels[g].strip().lower() for g in gold]
        return {
            "gold": gold.astype(np.int16),
            "label_prob": lp.astype(np.float32),
            "label_prob_norm": ln.astype(np.float32),
            "pred_label": pred,
            "confidence": ln.max(axis=1).astype(np.float32),
            "correct": pred == gold,
            "label_scoring": np.array([self.scoring] * len(gold), dtype=object),
            "top_token_id": top_ids,
            "top_token": np.array(top_shown, dtype=object),
            "top_token_prob": parts["top_prob"].astype(np.float32),
            "correct_vocab": np.array([g in t.lower() for g, t in zip(gold_words, top_text, strict=True)]),
        }


def _to_host(parts: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in parts.items()}
