"""One unit of the token axis: forward every example touching it, keep its rows and owned predictions.

A unit is ``chunk_rows`` consecutive rows of the token axis (store/layout.py). An example that straddles a
unit boundary is forwarded in both units; its rows are split between them, its prediction belongs to the
unit that owns it, and its attributions are computed once and kept for the next unit (``IGState``).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from qcache.extract.arch.adapters import ModelTaps
from qcache.extract.attrib.attribution import Attributor
from qcache.extract.attrib.ig_fast import LayerCache
from qcache.extract.inputs.datasets import Dataset
from qcache.extract.inputs.tokenize import Tokenized
from qcache.extract.models.loading import LoadedModel
from qcache.extract.quant.cpu_half import half_matmuls_in_float32
from qcache.extract.quant.quantization import activation_dtype, compute_dtype
from qcache.extract.run import experts as moe_rows
from qcache.extract.run.batching import Batching
from qcache.extract.run.hooks import Capture, capturing
from qcache.extract.run.readout import Readout
from qcache.extract.run.transfer import Fetch, side_stream, to_device
from qcache.store import TokenLayout
from qcache.store.keys import ATTRIBUTIONS, TAP_ARRAYS, layer_name


def compute_unit(
    unit: int,
    loaded: LoadedModel,
    taps: ModelTaps,
    points: list[tuple[int, str]],
    readout: Readout,
    data: Dataset,
    tok: Tokenized,
    layout: TokenLayout,
    bar: tqdm,
    batching: Batching,
    ig: IGState | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Forward every example touching ``unit``; return its row blocks, owned predictions, NaN count.

    ``batching`` groups, pads and positions the examples (extract/run/batching.py); under ``authors`` a batch
    may hold examples outside the unit, forwarded only as batch mates (their rows and predictions are not
    kept).
    """
    r0, r1 = layout.unit_rows(unit)
    dtype = np.dtype(activation_dtype(loaded.quant))  # float32 from fp32/bf16 compute, else float16
    # dense arrays (an MoE layer without a shared expert has its act/down-in per expert only)
    paths = {p: f"layers/{layer_name(p[0])}/{TAP_ARRAYS[p[1]]}" for p in points if taps.has_dense(*p)}
    # array path -> (unit rows, neurons)
    blocks = {path: np.empty((r1 - r0, taps.width(*p)), dtype=dtype) for p, path in paths.items()}
    layers = sorted({n for n, _ in points})
    run_taps = tuple(dict.fromkeys(t for _, t in points))
    blocks.update(moe_rows.empty_blocks(taps.moe, layers, run_taps, r1 - r0, dtype))
    hooked = list(points)
    if ig is not None:
        blocks.update({ig.path(n): np.empty((r1 - r0, taps.width(n, "act")), np.float32) for n in ig.layers})
        hooked += [(n, "act") for n in ig.layers if (n, "act") not in points]
    pad_id = batching.pad_id(loaded.tokenizer)
    owned: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    dev = loaded.device
    nonfinite = torch.zeros((), dtype=torch.int64, device=dev)  # counted on the device, read once
    out_dtype = torch.float32 if dtype == np.float32 else torch.float16
    stream = side_stream(dev)
    # Without IG and with first-token scoring a batch's results are read after the next batch is queued,
    # so the GPU never waits for the host; IG and sequence scoring run more model work per batch on the
    # results, so they are handled at once.
    deferred = ig is None and readout.scoring == "first-token"
    pending: _Pending | None = None
    capture = Capture()
    for batch in batching.unit_batches(layout, unit):
        lengths = layout.lengths[batch]
        fwd = batching.inputs(tok.ids, batch, pad_id)
        seq = fwd.ids.shape[1]
        input_ids = to_device(fwd.ids, dev)  # (batch, seq)
        attention = to_device(fwd.mask, dev)  # (batch, seq), 1 on real tokens
        model_mask = None if fwd.model_mask is None else to_device(fwd.model_mask, dev)
        positions = None if fwd.position_ids is None else to_device(fwd.position_ids, dev)
        capture.last_index = to_device(fwd.last_index, dev)
        # rows of the (batch * seq) flattening that hold real tokens, known here without asking the GPU
        real = to_device(np.flatnonzero(fwd.mask.reshape(-1)), dev)
        mine = layout.owner_units[batch] == unit
        picked = to_device(np.flatnonzero(mine), dev)
        caches: dict[int, LayerCache] = {}
        with ExitStack() as modes:
            if batching.mode == "authors":  # as generate runs: no_grad, PyTorch's own kernels
                modes.enter_context(torch.no_grad())
            elif ig is None:  # no autograd; CPU half matmuls widened to float32 (2.6x at fp16)
                modes.enter_context(torch.inference_mode())
                modes.enter_context(
                    half_matmuls_in_float32(dev, compute_dtype(loaded.quant), undecomposed=True)
                )
            else:  # IG replays this forward's tensors under autograd (inference tensors refuse), and
                # it keeps PyTorch's own kernels, the ones a direct Captum call runs
                modes.enter_context(torch.no_grad())
            modes.enter_context(capturing(taps, hooked, capture))
            if ig is not None:
                modes.enter_context(ig.recording(caches))
            out = loaded.model(
                input_ids=input_ids, attention_mask=model_mask, position_ids=positions, use_cache=False
            )
            logits = out.logits[:, -1]  # (batch, vocab)
        rows: dict[str, torch.Tensor] = {}
        for point, path in paths.items():
            t = taps.as_tokens(capture.tensors[point], len(batch), seq)
            t = t.reshape(len(batch) * seq, -1).index_select(0, real)  # (real tokens, neurons)
            nonfinite += (~torch.isfinite(t)).sum()
            rows[path] = t.to(out_dtype)
        experts, bad = moe_rows.device_rows(capture, layers, real, out_dtype, len(batch) * seq)
        rows.update(experts)
        nonfinite += bad
        parts = readout.device_parts(logits.index_select(0, picked)) if deferred and mine.any() else {}
        fetch = Fetch({**rows, **{f"readout/{k}": v for k, v in parts.items()}}, stream)
        if pending is not None:  # the previous batch, now that this one is queued
            _finish(pending, blocks, owned, readout, data, layout, unit, bar)
        pending = _Pending(batch, lengths, mine, fetch, None)
        if not deferred:
            if ig is not None:
                ig.attribute(batch, lengths, input_ids, attention, logits, capture, caches, data.gold)
            if mine.any():
                cols = readout(logits.index_select(0, picked), data.gold[batch[mine]], batch[mine])
                if ig is not None:
                    cols.update(ig.columns(batch[mine]))
                pending.columns = cols
            if ig is not None:
                pending.ig_rows = {
                    ig.path(n): np.concatenate([ig.done[int(e)][0][n] for e in batch]) for n in ig.layers
                }  # (real tokens, neurons) per layer
            _finish(pending, blocks, owned, readout, data, layout, unit, bar)
            pending = None
    if pending is not None:
        _finish(pending, blocks, owned, readout, data, layout, unit, bar)
    if ig is not None:
        ig.forget(layout, r1)
    return blocks, _merge_predictions(owned), int(nonfinite)


@dataclass
class _Pending:
    """A forward batch whose results are on their way to the host."""

    batch: np.ndarray  # example ids
    lengths: np.ndarray  # (batch,) real tokens
    mine: np.ndarray  # (batch,) bool: predictions this unit owns
    fetch: Fetch  # activation rows per array path; readout parts under "readout/"
    columns: dict[str, np.ndarray] | None  # prediction columns already read (IG, sequence scoring)
    ig_rows: dict[str, np.ndarray] = field(default_factory=dict)  # attribution rows per array path


def _finish(
    p: _Pending,
    blocks: dict[str, np.ndarray],
    owned: list[tuple[np.ndarray, dict[str, np.ndarray]]],
    readout: Readout,
    data: Dataset,
    layout: TokenLayout,
    unit: int,
    bar: tqdm,
) -> None:
    """Scatter a batch's rows into the unit's blocks and keep the predictions the unit owns."""
    r0, r1 = layout.unit_rows(unit)
    arrays = p.fetch.result()
    for path, rows in [*arrays.items(), *p.ig_rows.items()]:
        if not path.startswith(("readout/", "moe/")):
            _scatter_rows(blocks[path], rows, p.batch, p.lengths, layout, r0, r1)
    moe_rows.scatter(blocks, arrays, p.batch, p.lengths, layout, r0, r1)
    if p.mine.any():
        cols = p.columns
        if cols is None:
            parts = {k.removeprefix("readout/"): v for k, v in arrays.items() if k.startswith("readout/")}
            cols = readout.host_columns(parts, data.gold[p.batch[p.mine]])
        owned.append((p.batch[p.mine], cols))
    bar.update(int(sum(_overlap(layout, e, r0, r1) for e in p.batch)))


class IGState:
    """The attributor plus attributions of examples that straddle into the next unit (computed once)."""

    def __init__(self, attributor: Attributor) -> None:
        self.attributor = attributor
        self.layers = attributor.layers
        self.recording = attributor.recording
        self.done: dict[int, tuple[dict[int, np.ndarray], dict[str, Any]]] = {}  # example -> rows, columns

    @staticmethod
    def path(layer: int) -> str:
        return f"layers/{layer_name(layer)}/{ATTRIBUTIONS}"

    def attribute(
        self,
        batch: np.ndarray,
        lengths: np.ndarray,
        ids: torch.Tensor,
        mask: torch.Tensor,
        logits: torch.Tensor,
        capture: Capture,
        caches: dict[int, LayerCache],
        gold: np.ndarray,
    ) -> None:
        todo = [i for i, e in enumerate(batch) if int(e) not in self.done]
        if not todo:
            return
        res = self.attributor(
            ids=ids,
            mask=mask,
            lengths=torch.from_numpy(lengths.astype(np.int64)).to(ids.device),
            logits=logits,
            acts={n: capture.tensors[(n, "act")] for n in self.layers},
            caches=caches,
            gold=gold[batch],
            examples=todo,
        )
        for j, i in enumerate(todo):
            n_tok = int(lengths[i])
            rows = {n: res.attributions[n][j, :n_tok] for n in self.layers}  # (tokens, neurons)
            self.done[int(batch[i])] = (rows, {k: v[j] for k, v in res.columns.items()})

    def columns(self, examples: np.ndarray) -> dict[str, np.ndarray]:
        recs = [self.done[int(e)][1] for e in examples]
        return {k: np.stack([r[k] for r in recs]) for k in recs[0]}

    def forget(self, layout: TokenLayout, r1: int) -> None:
        """Drop examples that end inside the unit just computed."""
        ends = {e: int(layout.starts[e] + layout.lengths[e]) for e in self.done}
        self.done = {e: v for e, v in self.done.items() if ends[e] > r1}


def _overlap(layout: TokenLayout, e: int, r0: int, r1: int) -> int:
    """How many of example ``e``'s rows fall inside ``[r0, r1)``."""
    s = int(layout.starts[e])
    return max(0, min(r1, s + int(layout.lengths[e])) - max(r0, s))


def _scatter_rows(
    block: np.ndarray,
    rows: np.ndarray,
    batch: np.ndarray,
    lengths: np.ndarray,
    layout: TokenLayout,
    r0: int,
    r1: int,
) -> None:
    """Copy each example's rows that fall inside ``[r0, r1)`` into the unit's block.

    ``block`` is ``(r1 - r0, neurons)``; ``rows`` is ``(sum(lengths), neurons)``, the batch's real tokens
    example after example.
    """
    offset = 0
    for e, n in zip(batch, lengths, strict=True):
        s = int(layout.starts[e])
        lo, hi = max(r0, s), min(r1, s + int(n))
        if hi > lo:
            block[lo - r0 : hi - r0] = rows[offset + lo - s : offset + hi - s]
        offset += int(n)


def _merge_predictions(owned: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """One column per name, rows sorted by example id, from the batches' ``(examples, columns)``."""
    if not owned:
        return {"example_id": np.zeros(0, np.int32)}
    ids = np.concatenate([ex for ex, _ in owned]).astype(np.int32)
    order = np.argsort(ids)
    merged = {"example_id": ids[order]}
    for name in owned[0][1]:
        merged[name] = np.concatenate([cols[name] for _, cols in owned])[order]
    return merged
