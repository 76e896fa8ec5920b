"""``--label-scoring sequence``: each label word scored by the log-likelihood of its whole token sequence.

This is lm-evaluation-harness's ``loglikelihood`` of a multiple-choice request (``TemplateLM._encode_pair``
in lm_eval/api/model.py): the continuation is ``target_delimiter + word`` with the delimiter ``" "``;
whitespace that ends the prompt is moved from the context into the continuation; the continuation tokens
are ``tokens(context + continuation)[len(tokens(context)):]`` (both without special tokens, as lm-eval's
causal ``tok_encode``), and the score is the sum of their log-softmax probabilities given the context and
the continuation tokens before them.

The context the model sees is the prompt's tokens as qcache forwards them (with the tokenizer's special
tokens, long prompts losing their front: tokenize.py), so the prompt forward is reused: a label whose
continuation is one token is read from that forward's last-position logits. Each (example, label) whose
continuation has more tokens, and every label of a prompt that ends in whitespace (its context is the
prompt without it), takes one more forward of ``context + continuation[:-1]``, batched over pairs; the
activation hooks are not attached during those forwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qcache.extract.inputs.datasets import Dataset
from qcache.extract.inputs.tokenize import Tokenized, tokenize
from qcache.extract.models.loading import LoadedModel
from qcache.extract.quant.cpu_half import half_matmuls_in_float32
from qcache.extract.quant.quantization import compute_dtype
from qcache.extract.run.readout import SCORINGS, Readout, check_separable, label_tokens
from qcache.store.errors import DataError, InvalidOption

DELIMITER = " "  # lm-eval's default ``target_delimiter``


def check_label_scoring(tokenizer: Any, labels: tuple[str, ...], scoring: str, ig_target: str | None) -> None:
    """Refuse, from the tokenizer alone (before any weights are read), what the labels cannot support.

    ``first-token`` scoring, and Integrated-Gradients attributions of the gold label (``ig_target ==
    "gold"``, whose target is the gold word's first token), need labels separable by their first token
    (``readout.separation_problem``). Raises ``InvalidOption`` with one line naming the colliding words.
    """
    if scoring not in SCORINGS:
        raise InvalidOption(f"--label-scoring {scoring!r} is unknown: use one of {', '.join(SCORINGS)}")
    tokens = label_tokens(tokenizer, labels)
    if scoring == "first-token":
        fix = "use --label-scoring sequence, which scores each label's whole token sequence"
        check_separable(tokens, tokenizer, "--label-scoring first-token", fix)
    if ig_target == "gold":
        fix = "the gold target is undefined for them: use --ig-target predicted, or other label words"
        check_separable(tokens, tokenizer, "--ig-target gold", fix)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[str, list[int]]:
    """lm-eval's ``_encode_pair`` for a causal model: the context text it keeps, and the continuation ids.

    Raises ``DataError`` when the continuation tokenizes to nothing.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
    ids = [int(i) for i in whole[n_context:]]
    if not ids:
        raise DataError(f"continuation {continuation!r} tokenizes to nothing after its context")
    return context, ids


class SequenceReadout(Readout):
    """The prediction columns from whole-sequence log-likelihoods of the label words.

    ``label_prob[e, k] = exp(sum_j log p(c_kj | context_e, c_k<j))``, the probability of label ``k``'s whole
    continuation; ``label_prob_norm`` renormalizes it over the labels (a softmax of the summed
    log-probabilities, stable when the probabilities underflow float32). The top-token columns are read
    from the prompt's next-token distribution, as with first-token scoring.
    """

    scoring = "sequence"

    def __init__(
        self,
        tokenizer: Any,
        labels: tuple[str, ...],
        device: torch.device,
        prompts: list[str],
        tok: Tokenized,
        max_length: int,
        model: nn.Module | None = None,
        quant: str = "fp32",
        batch_size: int = 16,
    ) -> None:
        super().__init__(tokenizer, labels, device)
        self.model, self.quant, self.device, self.batch_size = model, quant, device, max(1, batch_size)
        self.prompt_ids = tok.ids
        # per example: the context ids when they differ from the forwarded prompt (trailing whitespace)
        self.context: list[np.ndarray | None] = []
        self.continuations: list[list[tuple[int, ...]]] = []  # per example, per label
        stripped: dict[int, str] = {}
        for e, prompt in enumerate(prompts):
            conts = []
            for word in labels:
                context, ids = encode_pair(tokenizer, prompt, DELIMITER + word)
                conts.append(tuple(ids))
            self.continuations.append(conts)
            if context != prompt:
                stripped[e] = context
        self.context = [None] * len(prompts)
        if stripped:
            ctx = tokenize(tokenizer, list(stripped.values()), max_length)  # truncated as the prompts are
            for e, ids in zip(stripped, ctx.ids, strict=True):
                self.context[e] = ids

    def manifest(self) -> dict[str, Any]:
        """The scoring, its delimiter and each label's token ids.

        ``label_token_ids[w]``: the continuation token sequence scored for label ``w`` (the most common one
        over the examples, first seen on a tie); ``continuation_token_ids[w]``: every distinct one;
        ``first_token_ids[w]``: the single-token spellings first-token scoring would read (what
        ``--ig-target gold`` targets), with the rule and the ids two labels share.
        """
        counts: dict[str, Counter[tuple[int, ...]]] = {w: Counter() for w in self.labels}
        for conts in self.continuations:
            for w, ids in zip(self.labels, conts, strict=True):
                counts[w][tuple(ids)] += 1
        first = self.tokens.manifest()
        return {
            "scoring": self.scoring,
            "delimiter": DELIMITER,
            "continuation": "lm-eval loglikelihood: delimiter + word, prompt-final whitespace moved into it",
            "label_token_ids": {w: list(c.most_common(1)[0][0]) if c else [] for w, c in counts.items()},
            "continuation_token_ids": {w: [list(ids) for ids in c] for w, c in counts.items()},
            "n_examples_context_stripped": sum(c is not None for c in self.context),
            "first_token_ids": first["label_token_ids"],
            "dropped_shared_ids": first["dropped_shared_ids"],
            "rule": first["rule"],
        }

    def __call__(
        self, logits: torch.Tensor, gold: np.ndarray, examples: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """``logits`` (examples, vocab) at each example's last real token; ``examples`` their ids."""
        if examples is None:
            raise ValueError("sequence scoring needs the example ids of the logits' rows")
        probs = torch.softmax(logits.float(), dim=-1)  # (examples, vocab)
        first = torch.log_softmax(logits.float(), dim=-1)
        scores = np.zeros((len(examples), len(self.labels)), dtype=np.float64)  # summed log-probs
        jobs: list[_Forward] = []
        for i, e in enumerate(int(x) for x in examples):
            ctx = self.context[e]
            base = self.prompt_ids[e] if ctx is None else ctx
            riders: list[tuple[int, tuple[int, ...]]] = []
            for k, cont in enumerate(self.continuations[e]):
                if ctx is None and len(cont) == 1:  # the prompt forward already predicted it
                    scores[i, k] = float(first[i, cont[0]])
                else:
                    riders.append((k, cont))
            jobs += _carriers(i, base, riders)
        if jobs:
            for job, values in zip(jobs, self._forward(jobs), strict=True):
                for (k, _), value in zip(job.riders, values, strict=True):
                    scores[job.row, k] = value
        label_prob = torch.from_numpy(np.exp(scores))
        norm = torch.softmax(torch.from_numpy(scores), dim=1)
        return self.columns(probs, label_prob, gold, norm)

    def _forward(self, jobs: list[_Forward]) -> list[list[float]]:
        """Per job, the summed continuation log-probs of its riders; ``batch_size`` jobs per forward."""
        if self.model is None:
            raise ValueError("this readout was built without a model (manifest only)")
        out: list[list[float]] = [[] for _ in jobs]
        order = sorted(range(len(jobs)), key=lambda j: len(jobs[j].ids))  # less padding per batch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dev = self.device
        for start in range(0, len(order), self.batch_size):
            part = order[start : start + self.batch_size]
            seq = max(len(jobs[j].ids) for j in part)
            span = max(len(jobs[j].ids) - jobs[j].n_context + 1 for j in part)
            ids = np.full((len(part), seq), pad, dtype=np.int64)  # (jobs, seq), right padded
            mask = np.zeros((len(part), seq), dtype=np.int64)  # 1 on real tokens
            where = np.zeros((len(part), span), dtype=np.int64)  # positions from the context's last on
            for r, j in enumerate(part):
                x, n_ctx = jobs[j].ids, jobs[j].n_context
                ids[r, : len(x)], mask[r, : len(x)] = x, 1
                where[r] = np.minimum(np.arange(n_ctx - 1, n_ctx - 1 + span), len(x) - 1)
            with (
                torch.inference_mode(),
                half_matmuls_in_float32(dev, compute_dtype(self.quant), undecomposed=True),
                _head_at_positions(self.model, torch.from_numpy(where).to(dev)),
            ):
                logits = self.model(
                    input_ids=torch.from_numpy(ids).to(dev),
                    attention_mask=torch.from_numpy(mask).to(dev),
                    use_cache=False,
                ).logits  # (jobs, span, vocab): position n_ctx - 1 + j predicts continuation token j
                logp = torch.log_softmax(logits.float(), dim=-1).double().cpu()
            for r, j in enumerate(part):
                for _, cont in jobs[j].riders:
                    steps = torch.arange(len(cont))
                    out[j].append(float(logp[r, steps, torch.tensor(cont)].sum()))
        return out


@dataclass(frozen=True)
class _Forward:
    """One extra forward of ``ids`` (context + continuation tokens but the last) for example row ``row``."""

    row: int
    ids: np.ndarray  # (tokens,)
    n_context: int
    riders: list[tuple[int, tuple[int, ...]]]  # (label, continuation ids) read from this forward


def _carriers(row: int, base: np.ndarray, riders: list[tuple[int, tuple[int, ...]]]) -> list[_Forward]:
    """The forwards that score ``riders`` after context ``base``: a label whose ``continuation[:-1]`` is a
    prefix of another's rides on that one's forward (a causal model's logits at a position depend only on
    the tokens up to it): SmolLM2's `` 1``, `` 5``, `` 10`` (' ' '1', ' ' '5', ' ' '1' '0') cost one."""
    jobs: list[_Forward] = []
    for k, cont in sorted(riders, key=lambda r: -len(r[1])):
        head = cont[:-1]
        for job in jobs:
            if tuple(int(t) for t in job.ids[job.n_context : job.n_context + len(head)]) == head:
                job.riders.append((k, cont))
                break
        else:
            ids = np.concatenate([base, np.asarray(head, dtype=base.dtype)])
            jobs.append(_Forward(row, ids, len(base), [(k, cont)]))
    return jobs


@contextmanager
def _head_at_positions(model: nn.Module, where: torch.Tensor) -> Iterator[None]:
    """Feed the LM head only positions ``where[b, j]`` of each row ``b``: logits become (B, J, V)."""

    def gather(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]  # (batch, tokens, hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        return (hidden[rows, where.to(hidden.device)], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def make_readout(
    scoring: str,
    loaded: LoadedModel,
    data: Dataset,
    tok: Tokenized,
    max_length: int,
    device: torch.device,
    *,
    batch_size: int = 16,
    run: bool = False,
) -> Readout:
    """The readout of ``scoring`` (``first-token`` or ``sequence``) for ``data`` tokenized as ``tok``.

    ``run``: the sequence readout may run ``loaded.model`` for its extra forwards (else it only describes
    itself for the manifest).
    """
    if scoring == "first-token":
        return Readout(loaded.tokenizer, data.labels, device)
    if scoring == "sequence":
        model = loaded.model if run else None
        return SequenceReadout(
            loaded.tokenizer,
            data.labels,
            device,
            data.prompts,
            tok,
            max_length,
            model,
            loaded.quant,
            batch_size,
        )
    raise InvalidOption(f"--label-scoring {scoring!r} is unknown: use one of {', '.join(SCORINGS)}")
