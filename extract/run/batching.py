"""How a unit's examples are grouped, padded and positioned for its forward passes (``--batching``).

``length-sorted`` (the default): each unit's examples sorted by length and padded on the right. A unit of
long, uneven prompts (Jigsaw comments: 93 tokens on average, some 500) holds only a dozen examples; padding
them all to the longest did twice the work the tokens needed. A batch ends at ``batch_size`` examples, or
before the example whose length would pad the batch past ``1 + MAX_PADDING`` times its real tokens. Short,
even prompts (BoolQ questions) still fill whole batches.

``authors``: the authors' code (src/0_softmax.py) runs consecutive examples, ``batch_size`` (32 in their
README) at a time, left-padded with pad = EOS (src/utils.py), through ``model.generate(...,
max_new_tokens=1)``. LLM.int8 picks its fp16 outlier columns from the whole batch (pad rows included), so
its numbers can only be reproduced with their batches. The batches are global and fixed, example ids
``[g * batch_size, (g + 1) * batch_size)``: a unit forwards every whole batch that touches it, so both halves
of an example straddling two units come from the same batch. The positions and mask are what transformers'
``generate`` derives for that call (transformers 5.x ``GenerationMixin._prepare_position_ids_for_generation``,
then ``generate`` itself): ``position_ids = cumsum(mask) - 1``, 0 on padding, and the mask is dropped when the
batch has no padding. The forward runs under ``torch.no_grad`` with PyTorch's own kernels, as ``generate``
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qcache.store import TokenLayout
from qcache.store.errors import InvalidOption

MAX_PADDING = 0.25  # padded tokens allowed per real token in a batch of two or more examples
MODES = ("length-sorted", "authors")
# length-sorted: qcache's own default; authors: their README runs 0_softmax.py and
# 4_generate_activations_h5py.py with batch 32
DEFAULT_BATCH_SIZE = {"length-sorted": 16, "authors": 32}


def length_batches(lengths: np.ndarray, batch_size: int) -> list[slice]:
    """Slices of ``lengths`` (sorted ascending) that form the forward batches."""
    out: list[slice] = []
    start, real = 0, 0
    for i, n in enumerate(lengths.tolist()):
        rows = i - start + 1
        if rows > 1 and (rows > batch_size or rows * n > (1 + MAX_PADDING) * (real + n)):
            out.append(slice(start, i))
            start, real = i, 0
        real += n
    if len(lengths):
        out.append(slice(start, len(lengths)))
    return out


@dataclass(frozen=True)
class ForwardInputs:
    """One padded batch as numpy arrays; ``None`` position ids or mask: the model's default."""

    ids: np.ndarray  # (batch, seq) int64 token ids, padding included
    mask: np.ndarray  # (batch, seq) int64, 1 on real tokens (which rows are cached)
    model_mask: np.ndarray | None  # the attention mask the model is given
    position_ids: np.ndarray | None  # (batch, seq) int64
    last_index: np.ndarray  # (batch,) int64 position of each example's last real token


@dataclass(frozen=True)
class Batching:
    """A batching mode and its batch size (``None``: the mode's default, 16 or 32)."""

    mode: str = "length-sorted"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidOption(f"--batching {self.mode!r} is unknown: use one of {', '.join(MODES)}")
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", DEFAULT_BATCH_SIZE[self.mode])
        elif self.batch_size < 1:
            raise InvalidOption(f"--batch-size {self.batch_size!r} must be at least 1")

    @property
    def size(self) -> int:
        assert self.batch_size is not None  # set in __post_init__
        return self.batch_size

    def unit_batches(self, layout: TokenLayout, unit: int) -> list[np.ndarray]:
        """Example ids of each forward batch of ``unit`` (authors: some may not touch the unit)."""
        examples = layout.unit_examples(unit)
        if not len(examples):
            return []
        if self.mode == "length-sorted":
            examples = examples[np.argsort(layout.lengths[examples], kind="stable")]  # less padding
            return [examples[p] for p in length_batches(layout.lengths[examples], self.size)]
        size, n = self.size, layout.n_examples
        first, last = int(examples[0]) // size, int(examples[-1]) // size
        return [np.arange(g * size, min((g + 1) * size, n)) for g in range(first, last + 1)]

    def pad_id(self, tokenizer: Any) -> int:
        """The id written into padded positions: the tokenizer's pad, or EOS as the authors set it."""
        return int(tokenizer.eos_token_id if self.mode == "authors" else tokenizer.pad_token_id)

    def inputs(self, token_ids: list[np.ndarray], batch: np.ndarray, pad_id: int) -> ForwardInputs:
        """Pad the examples ``batch`` (their ``token_ids``) into one forward's inputs."""
        lengths = np.array([len(token_ids[e]) for e in batch], dtype=np.int64)
        seq = int(lengths.max())
        ids = np.full((len(batch), seq), pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), seq), dtype=np.int64)
        left = self.mode == "authors"
        for i, e in enumerate(batch):
            cols = slice(seq - lengths[i], seq) if left else slice(0, lengths[i])
            ids[i, cols] = token_ids[e]
            mask[i, cols] = 1
        if not left:
            return ForwardInputs(ids, mask, mask, None, lengths - 1)
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)
        model_mask = None if mask.all() else mask  # generate drops an all-ones mask
        return ForwardInputs(ids, mask, model_mask, positions, np.full(len(batch), seq - 1, np.int64))

    def manifest(self, pad_id: int) -> dict[str, Any]:
        """What the manifest records; ``mode`` and ``batch_size`` are part of the run's identity."""
        common = {"mode": self.mode, "batch_size": self.size, "pad_token_id": pad_id}
        if self.mode == "length-sorted":
            return {
                **common,
                "order": "each unit's examples sorted by length",
                # a batch ends before its padding passes this share of its real tokens
                "max_padding": MAX_PADDING,
                "padding_side": "right",
                "position_ids": "the model's default (0..seq-1)",
            }
        return {
            **common,
            "order": "consecutive example ids, fixed batches [g*batch_size, (g+1)*batch_size)",
            "padding_side": "left",
            "position_ids": "cumsum(attention_mask) - 1, 0 on padding (transformers generate)",
            "attention_mask": "dropped when a batch has no padding (transformers generate)",
            "grad_mode": "torch.no_grad, PyTorch's own kernels (no CPU half-matmul widening)",
        }
