"""The batch size of a run (``--batch-size``) when none is given: a resumed run's own, else a default by
batching mode, device type and quantization method (docs/extract.md, "Batch sizes").

The batch size is part of a run's identity (``store.manifest.batching_identity``): LLM.int8 picks its fp16
outlier columns over the whole batch, so its values change with the batch. Defaults therefore never change
a run's batches under it: a resume adopts the stored size, and methods whose values depend on the batch
keep one default on every device.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qcache.extract.quant.registry import parse_key
from qcache.extract.run.batching import DEFAULT_BATCH_SIZE
from qcache.store import RunKey, RunWriter, open_store
from qcache.store.errors import InvalidOption
from qcache.store.manifest import batching_identity

if TYPE_CHECKING:
    from qcache.extract.run.runner import ExtractConfig

# length-sorted on CUDA, for methods whose activations of an example do not depend on its batch companions
# (plain floats, weight-only methods: a batch changes them only by rounding). A unit (1,024 token rows) of
# BoolQ prompts (~22 tokens) holds ~46 examples: 64 forwards it in one batch, where 16 left an H200 idle
# on three small ones. A length-sorted batch never crosses a unit, so a forward stays <= ~1,280 tokens.
CUDA_BATCH_SIZE = 64
# weight+activation methods keep DEFAULT_BATCH_SIZE on every device: LLM.int8 picks its fp16 outlier columns
# over the whole batch, so an example's values depend on its batch; one default everywhere keeps an int8
# run's batches the same whichever device computes it
BATCH_DEPENDENT_KINDS = ("weight+activation",)  # quant/method.py WEIGHT_ACTIVATION


def batch_dependent(quant: str) -> bool:
    """Whether run key ``quant``'s values of an example depend on the other rows of its batch (LLM.int8's
    outlier columns); such runs use fixed batch sizes on every device, forward and IG step batches alike."""
    return parse_key(quant).kind in BATCH_DEPENDENT_KINDS


def default_batch_size(mode: str, device_type: str, kind: str) -> int:
    """``--batch-size`` when not given: by batching mode, device type (``cpu``, ``cuda``, ...) and the
    quantization method's kind (``none``, ``weight-only``, ``weight+activation``; quant/method.py).

    ``authors``: 32 everywhere (their batches). ``length-sorted``: 16, or ``CUDA_BATCH_SIZE`` (64) on CUDA
    for methods whose values do not depend on the batch. CPU runs keep 16, as before device defaults.
    """
    if mode == "length-sorted" and device_type == "cuda" and kind not in BATCH_DEPENDENT_KINDS:
        return CUDA_BATCH_SIZE
    return DEFAULT_BATCH_SIZE[mode]


def resolve_batch_size(
    given: int | None, mode: str, device_type: str, kind: str, stored: dict[str, Any] | None = None
) -> tuple[int, str]:
    """``(batch size, where it comes from)`` for a run: ``given`` (``--batch-size``) when not ``None``;
    else the stored run's (``stored``: ``store.manifest.batching_identity`` of the run being resumed, used
    when its mode is ``mode``: the batch size is part of a run's identity, so a resume keeps it); else
    ``default_batch_size``. An explicit value that differs from the stored one is refused later, by the
    run's identity check (``RunMismatch``)."""
    if given is not None:
        return given, "--batch-size"
    if stored is not None and stored.get("mode") == mode and stored.get("batch_size") is not None:
        return int(stored["batch_size"]), "the stored run's (resumed)"
    size = default_batch_size(mode, device_type, kind)
    if mode == "authors":
        return size, "the default of --batching authors"
    if kind in BATCH_DEPENDENT_KINDS:
        return size, "the default of weight+activation methods on every device (values depend on the batch)"
    if device_type == "cuda":
        return size, "the CUDA default of unquantized and weight-only methods"
    return size, f"the default on {device_type}"


def device_type(device: str) -> str:
    """The type (``cpu``, ``cuda`` ...) of the device a run with ``--device device`` uses; touches no GPU
    context (``auto``: CUDA when this machine has it). Raises ``InvalidOption`` for a name torch rejects."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device).type
    except RuntimeError as exc:
        raise InvalidOption(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from exc


def stored_batching(store_path: Path, key: RunKey) -> dict | None:
    """The batching mode and batch size of run ``key`` in the local store at ``store_path``; ``None``
    when there is no such store or run, or it recorded none (``store.manifest.batching_identity``)."""
    if not (Path(store_path) / "zarr.json").exists():
        return None
    store = open_store(store_path)
    if not RunWriter.exists(store, key):
        return None
    return batching_identity(store.run(key).manifest)


def with_batch_size(cfg: ExtractConfig, key: RunKey) -> tuple[ExtractConfig, str]:
    """``cfg`` with its batch size resolved (``resolve_batch_size``), and where it came from.

    Without ``--batch-size`` a run being resumed (not ``--overwrite``) keeps its stored batch size, so a
    run started on a CPU (16) resumes on a GPU (whose default is 64) with the same batches, and the
    launcher's children adopt what their parent created. A given one that differs is refused by the run's
    identity check, before any weights are read.
    """
    stored = None if cfg.overwrite or cfg.batch_size is not None else stored_batching(cfg.store, key)
    kind = parse_key(str(cfg.quant)).kind
    size, why = resolve_batch_size(cfg.batch_size, cfg.batching, device_type(cfg.device), kind, stored)
    return replace(cfg, batch_size=size), why
