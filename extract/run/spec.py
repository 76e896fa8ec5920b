"""A run's spec: its manifest (what was asked, what was loaded, library versions), token layout and arrays.

Built once per run by ``prepare_run`` (runner.py); every process that writes the run builds the same spec.
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qcache import __version__
from qcache.extract.arch.adapters import ModelTaps
from qcache.extract.arch.moe import LayerExperts
from qcache.extract.attrib.attribution import Attributor
from qcache.extract.inputs.datasets import Dataset
from qcache.extract.inputs.token_text import CONVENTION, token_strings
from qcache.extract.inputs.tokenize import Tokenized
from qcache.extract.models.loading import LoadedModel
from qcache.extract.quant.method import library_version
from qcache.extract.quant.quantization import activation_dtype, describe, method_of
from qcache.extract.run.experts import manifest_entries, moe_arrays
from qcache.extract.run.scoring import make_readout
from qcache.store import ArraySpec, RunKey, RunSpec, TokenLayout
from qcache.store.keys import ATTRIBUTIONS, TAP_ARRAYS, layer_name

if TYPE_CHECKING:
    from qcache.extract.run.runner import ExtractConfig


def build_run_spec(
    key: RunKey,
    cfg: ExtractConfig,
    loaded: LoadedModel,
    taps: ModelTaps,
    layers: list[int],
    data: Dataset,
    tok: Tokenized,
    attributor: Attributor | None = None,
) -> RunSpec:
    """The spec of run ``key``: manifest, token layout, token ids and the ``(tokens, neurons)`` arrays."""
    layout = TokenLayout(lengths=tok.lengths, chunk_rows=cfg.chunk_rows)
    dtype = activation_dtype(loaded.quant)
    readout = make_readout(cfg.label_scoring, loaded, data, tok, cfg.max_length, torch.device("cpu"))
    source = loaded.source
    batch = cfg.batches
    pad_id = batch.pad_id(loaded.tokenizer)
    manifest: dict[str, Any] = {
        "model": source.key,
        "model_source": f"gguf:{source.gguf_file}" if source.gguf_file else source.source,
        "model_revision": loaded.revision,
        "architecture": type(loaded.model).__name__,
        "family": taps.adapter.family,
        "activation": taps.activation,
        "n_layers": taps.n_layers,
        "n_neurons": taps.n_neurons,
        "quant": loaded.quant,
        "quant_config": describe(loaded.quant),
        # what the method is, its library and version, every setting (not part of the identity)
        "quant_method": method_of(loaded.quant).describe(),
        "dtype": dtype,
        "layers": layers,
        "taps": list(cfg.taps),
        # mixture-of-experts layers: experts, routing and what was stored (extract/run/experts.py)
        "moe": manifest_entries(taps, layers, cfg.taps),
        "attributions": None if attributor is None else attributor.cfg.manifest(attributor.baseline_id),
        "dataset": data.spec,
        "max_length": cfg.max_length,
        "chunk_rows": cfg.chunk_rows,
        "n_examples": layout.n_examples,
        "n_tokens": layout.n_tokens,
        "n_truncated_examples": int((tok.n_truncated > 0).sum()),
        "label_scoring": cfg.label_scoring,
        "readout": readout.manifest(),
        "prompting": cfg.prompting.manifest(loaded.tokenizer, data.prompts[0] if data.prompts else None),
        "tokenization": {
            "padding": batch.manifest(pad_id)["padding_side"],
            "truncation": cfg.prompting.truncation,
            "token_strings": CONVENTION,
        },
        # LLM.int8 picks outlier columns per batch, so int8 activations depend on batch companions; the
        # mode and batch size are part of the run's identity (store/manifest.py)
        "batching": batch.manifest(pad_id),
        "device": _device_name(loaded.device),
        "versions": _versions(method_of(loaded.quant).library),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    if source.gguf_file:
        manifest["weights_note"] = (
            f"weights dequantized from {source.gguf_file}: the fp16/fp32 runs are a dequantized baseline, "
            "not the original full-precision model"
        )
    arrays = run_arrays(
        taps.width,
        loaded.quant,
        layers,
        cfg.taps,
        attributions=attributor is not None,
        dense=taps.has_dense,
        moe=taps.moe,
    )
    token_ids = np.concatenate(tok.ids) if tok.ids else np.zeros(0, np.int32)
    return RunSpec(
        key,
        manifest,
        layout,
        token_ids,
        data.gold,
        tok.n_truncated,
        arrays,
        data.source_rows,
        token_strings=token_strings(loaded.tokenizer, token_ids),
        prompts=tok.texts if tok.texts is not None else data.prompts,
    )


def run_arrays(
    width: Callable[[int, str], int],
    quant: str,
    layers: list[int],
    taps: tuple[str, ...],
    *,
    attributions: bool,
    dense: Callable[[int, str], bool] | None = None,
    moe: dict[int, LayerExperts] | None = None,
) -> tuple[ArraySpec, ...]:
    """The ``(tokens, width(layer, tap))`` arrays of a run: each layer's taps, then its attributions if asked,
    then the router and per-expert arrays of its mixture-of-experts layers (``extract/run/experts.py``).

    ``width`` is ``ModelTaps.width``: the MLP width for ``act``/``down-in``, the hidden size for ``resid``;
    ``dense`` (``ModelTaps.has_dense``) says which (layer, tap) has a dense array (default: all).
    """
    dtype = activation_dtype(quant)
    arrays = tuple(
        ArraySpec(f"layers/{layer_name(n)}/{TAP_ARRAYS[t]}", width(n, t), dtype)
        for n in layers
        for t in taps
        if dense is None or dense(n, t)
    )
    if attributions:  # float32 always: float16 underflows for attributions
        arrays += tuple(
            ArraySpec(f"layers/{layer_name(n)}/{ATTRIBUTIONS}", width(n, "act"), "float32") for n in layers
        )
    return arrays + moe_arrays(moe or {}, layers, taps, dtype)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def _versions(library: str) -> dict[str, str]:
    import transformers

    out = {
        "qcache": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    if library not in out and library_version(library) is not None:  # torchao, hqq, gguf
        out[library] = str(library_version(library))
    return out
