"""``qcache plan``: the disk, memory and time an extraction will need, before it starts.

Built from the model's config (``architecture.py``), the dataset's token count (its tokenizer when local,
else an estimate from characters, said so) and the same ``ExtractConfig`` extraction takes. Disk figures
are exact array shapes; memory and time are estimates whose assumptions ``footprint.py`` and
``throughput.py`` state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qcache.extract.arch.adapters import parse_layers
from qcache.extract.inputs.datasets import Dataset, load_dataset
from qcache.extract.inputs.prompting import Prompting, require_chat_template
from qcache.extract.inputs.tokenize import tokenize
from qcache.extract.models.architecture import Architecture, describe_model
from qcache.extract.models.registry import ModelSource, resolve_model
from qcache.extract.plan.disk import Disk, existing_run, plan_disk
from qcache.extract.plan.footprint import WeightBytes, WorkingSet, weight_bytes, working_set
from qcache.extract.plan.throughput import calibrate, calibrate_model, default_rate, forward_flops, ig_flops
from qcache.extract.quant.quantization import plan_equivalent
from qcache.extract.run.batch_size import with_batch_size
from qcache.extract.run.batching import Batching
from qcache.extract.run.runner import ExtractConfig
from qcache.extract.run.spec import run_arrays
from qcache.store import RunKey, TokenLayout

CHARS_PER_TOKEN = 3.5  # SmolLM2's 49k BPE gives 3.8-4.3 on the shipped datasets; smaller vocabularies more


@dataclass(frozen=True)
class Tokens:
    n_examples: int
    n_tokens: int
    longest: int
    n_truncated: int  # examples longer than --max-length (they lose their front)
    exact: bool
    how: str


@dataclass(frozen=True)
class Memory:
    device: str
    weights: WeightBytes
    working: WorkingSet
    available: int | None  # the device's capacity, when it is on this machine

    @property
    def total(self) -> int:
        return self.weights.total + self.working.total


@dataclass(frozen=True)
class Time:
    forward_flops: float
    ig_flops: float
    padded_tokens: int  # tokens the forwards run, padding included
    rate: float  # FLOP/s
    rate_from: str
    ig_rate: float | None = None  # FLOP/s of IG step chunks when measured, else ``rate``

    @property
    def seconds(self) -> float:
        return self.forward_flops / self.rate + self.ig_flops / (self.ig_rate or self.rate)


@dataclass(frozen=True)
class Plan:
    key: str
    model: dict[str, Any]
    layers: list[int]
    taps: list[str]
    attributions: dict[str, Any] | None
    tokens: Tokens
    disk: Disk
    memory: Memory
    time: Time
    batching: dict[str, Any] | None = None  # mode, batch_size and where the size comes from ("from")

    @property
    def disk_ok(self) -> bool | None:
        return None if self.disk.free is None else self.disk.pending <= self.disk.free

    @property
    def memory_ok(self) -> bool | None:
        return None if self.memory.available is None else self.memory.total <= self.memory.available

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["disk"]["arrays"] = [
            {"path": a.path, "shape": list(a.shape), "dtype": a.dtype, "bytes": a.nbytes}
            for a in self.disk.arrays
        ]
        out["memory"].update(total=self.memory.total)
        out["memory"]["weights"]["total"] = self.memory.weights.total
        out["memory"]["working"]["total"] = self.memory.working.total
        out["time"]["seconds"] = self.time.seconds
        out.update(disk_ok=self.disk_ok, memory_ok=self.memory_ok)
        return out


def _widths(arch: Architecture) -> Callable[[int, str], int]:
    """Array width per (layer, tap): the hidden size for ``resid``, the MLP width otherwise."""
    return lambda _layer, tap: arch.hidden if tap == "resid" else arch.n_neurons


def plan_extract(cfg: ExtractConfig, *, measure: bool = False) -> Plan:
    """What ``run_extract(cfg)`` will need; ``measure`` loads the model and times one real forward batch
    (and one IG step chunk) on the run's device for the speed."""
    quant = str(cfg.quant)
    source = resolve_model(cfg.model)
    arch = describe_model(source)
    data = load_dataset(cfg.dataset)
    layers = parse_layers(cfg.layers, arch.n_layers)
    if cfg.prompting.chat_template and arch.tokenizer is not None:
        require_chat_template(arch.tokenizer, cfg.model)
    key = RunKey(cfg.prompting.dataset_key(data.name), source.key, quant)
    cfg, batch_from = with_batch_size(cfg, key)  # as extraction resolves it (a resumed run keeps its own)
    batching = {"mode": cfg.batching, "batch_size": cfg.batches.size, "from": batch_from}
    arrays = list(
        run_arrays(
            _widths(arch) if arch.taps is None else arch.taps.width,
            quant,
            layers,
            cfg.taps,
            attributions=cfg.attributions is not None,
            dense=None if arch.taps is None else arch.taps.has_dense,
            moe=arch.moe,
        )
    )
    tokens, lengths = count_tokens(arch, data, cfg.max_length, cfg.prompting)
    existing = existing_run(cfg, key, layers, tokens.n_tokens if tokens.exact else None)
    if existing.layout is not None and not tokens.exact:  # the stored run knows its tokens exactly
        lengths = existing.layout.lengths
        how = "exact (the stored run's token index)"
        tokens = Tokens(len(lengths), int(lengths.sum()), int(lengths.max()), existing.n_truncated, True, how)
    layout = TokenLayout(lengths=lengths, chunk_rows=cfg.chunk_rows)
    disk = plan_disk(cfg, key, layout, arrays, existing, n_labels=len(data.labels), n_layers=len(layers))
    device = _device(cfg.device)
    batches = forward_batches(layout, cfg.batches)
    ig = cfg.attributions
    extra_taps = 0 if ig is None or "act" in cfg.taps else len(layers)  # IG also hooks the act tap
    working = working_set(
        arch,
        quant,
        device,
        rows=min(cfg.batches.size, layout.n_examples),
        seq=tokens.longest,
        hooked=len(layers) * len(cfg.taps) + extra_taps,
        ig_layers=len(layers) if ig else 0,
        ig_batch_tokens=ig.batch_tokens if ig else None,
    )
    memory = Memory(device, weight_bytes(arch, quant), working, _capacity(device))
    padded = sum(r * t for r, t in batches)
    flops = forward_flops(arch, batches)
    # IG adds the baseline's forward of every batch and the step batches of every example and layer
    extra = flops + ig_flops(arch, lengths, layers, ig.steps) if ig else 0.0
    ig_rate = None
    if measure:
        rate, ig_rate, rate_from = measure_rates(cfg, source, arch, quant, device, batches, padded)
    else:
        rate, rate_from = default_rate(device, quant)
    ig_info = None if ig is None else {"steps": ig.steps, "method": ig.method}
    time = Time(flops, extra, padded, rate, rate_from, ig_rate)
    return Plan(
        str(key),
        _model_info(source, arch),
        layers,
        list(cfg.taps),
        ig_info,
        tokens,
        disk,
        memory,
        time,
        batching,
    )


def measure_rates(
    cfg: ExtractConfig,
    source: ModelSource,
    arch: Architecture,
    quant: str,
    device: str,
    batches: list[tuple[int, int]],
    padded: int,
) -> tuple[float, float | None, str]:
    """``(forward FLOP/s, IG FLOP/s or None, how)``: one real batch forward and one IG chunk of the model
    loaded as extraction loads it; a single Linear when its weights are not on this machine."""
    from qcache.extract.models.loading import load_model
    from qcache.store.errors import BackendUnavailable

    rows, seq = max(batches, key=lambda b: b[0] * b[1]) if batches else (1, 1)
    try:
        loaded = load_model(source, quant, device=device, for_gradients=cfg.attributions is not None)
    except BackendUnavailable as exc:
        rate = calibrate(arch, quant, device, min(padded // max(1, len(batches)), 4096))
        base = plan_equivalent(quant)
        what = quant if base == quant else f"{base} (for {quant})"
        how = f"measured: {what} Linear {arch.hidden}x{arch.n_neurons} on {device}, ~1 s (no weights: {exc})"
        return rate, None, how
    rate, ig_rate = calibrate_model(loaded, arch, rows, seq, cfg.attributions)
    how = f"measured: one {rows}x{seq}-token forward of the {quant} model on {device}"
    if ig_rate is not None:
        how += f"; IG {fmt_rate(ig_rate)} from one step chunk"
    return rate, ig_rate, how


def fmt_rate(rate: float) -> str:
    return f"{rate / 1e12:.2f} TFLOP/s" if rate >= 1e11 else f"{rate / 1e9:.1f} GFLOP/s"


def _model_info(source: ModelSource, arch: Architecture) -> dict[str, Any]:
    return {
        "source": source.description,
        "config": arch.config_from,
        "tokenizer": arch.tokenizer_from,
        "family": arch.family,
        "parameters": arch.n_params,
        "layers": arch.n_layers,
        "neurons": arch.n_neurons,
        "hidden": arch.hidden,
        "vocab": arch.vocab,
    }


def count_tokens(
    arch: Architecture, data: Dataset, max_length: int, prompting: Prompting | None = None
) -> tuple[Tokens, np.ndarray]:
    """Tokens per example after truncation: exact with the model's tokenizer, else estimated.

    The estimate does not know a chat template's tokens (it has no tokenizer to render it with).
    """
    if arch.tokenizer is not None:
        tok = tokenize(arch.tokenizer, data.prompts, max_length, prompting)
        lengths, truncated, exact = tok.lengths, int((tok.n_truncated > 0).sum()), True
        how = f"exact (tokenizer of {arch.tokenizer_from})"
    else:
        chars = np.array([len(p) for p in data.prompts], dtype=np.int64)
        full = np.ceil(chars / CHARS_PER_TOKEN).astype(np.int64) + 1
        lengths = np.minimum(full, max_length).astype(np.int32)
        truncated, exact = int((full > max_length).sum()), False
        how = f"estimate: no tokenizer here; {CHARS_PER_TOKEN} characters per token + 1 special token"
    n = int(lengths.sum())
    return Tokens(len(lengths), n, int(lengths.max()), truncated, exact, how), lengths


def forward_batches(layout: TokenLayout, batching: Batching) -> list[tuple[int, int]]:
    """``(rows, padded length)`` of every forward the runner makes, unit by unit.

    An example that straddles a unit boundary runs in both units, as in ``units.compute_unit`` (under
    ``authors`` batching, its whole batch does).
    """
    out = []
    for unit in range(layout.n_units):
        for batch in batching.unit_batches(layout, unit):
            out.append((len(batch), int(layout.lengths[batch].max())))
    return out


def _device(device: str) -> str:
    """The device a run with ``--device`` will use (``auto``: CUDA when this machine has it)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _capacity(device: str) -> int | None:
    """Memory of ``device`` when it is on this machine."""
    import os

    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
