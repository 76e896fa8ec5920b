"""The manifest: everything needed to reproduce a run, and the fingerprint that guards resumes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .errors import RunMismatch

# 2: bookkeeping outside the runs' Zarr groups, group metadata on every level, dimension names, token
# strings and prompts (docs/store.md). Schema 1 stores are still read (and their runs resumed).
SCHEMA_VERSION = 2

# Manifest fields that decide what the arrays hold. Resuming with any of them changed would mix two
# different experiments in one run, so it is refused.
IDENTITY_FIELDS = (
    "model_source",
    "quant_config",
    "dtype",
    "layers",
    "taps",
    "dataset",
    "max_length",
    "chunk_rows",
    "attributions",
    "label_scoring",
    "prompting",
)
# Identity fields added after runs were stored, with the value every run made before had. A manifest
# without one counts as having its default, and a field at its default stays out of the fingerprint, so
# those runs keep their fingerprint, resume and verify as before.
IDENTITY_DEFAULTS: dict[str, Any] = {"label_scoring": "first-token", "prompting": {"chat_template": False}}


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The identity fields of ``manifest``, missing late ones at their defaults."""
    return {k: manifest.get(k, IDENTITY_DEFAULTS.get(k)) for k in IDENTITY_FIELDS}


def batching_identity(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The batching mode and batch size a run's arrays were computed with; ``None`` if not recorded.

    Part of a run's identity for every quantization: LLM.int8 picks its fp16 outlier columns from the whole
    batch, so its activations and predictions change with the batch (13% on SmolLM2 layer 15), and units of
    two batchings must not mix in one run. fp32/fp16/NF4 change only by rounding, but a run that claims one
    batching should hold one, and a uniform rule cannot be mistaken. Compared in ``check_same_run``, not
    fingerprinted, so runs created before it keep verifying. Runs from before the ``mode`` field were
    length-sorted; runs from before the ``batching`` record are not compared (nothing to compare with).
    """
    batching = manifest.get("batching")
    if not isinstance(batching, dict) or batching.get("batch_size") is None:
        return None
    return {"mode": batching.get("mode", "length-sorted"), "batch_size": batching["batch_size"]}


def fingerprint(manifest: dict[str, Any]) -> str:
    """Stable hash of the identity fields of a manifest."""
    ident = {
        k: v for k, v in identity(manifest).items() if k not in IDENTITY_DEFAULTS or v != IDENTITY_DEFAULTS[k]
    }
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_run(existing: dict[str, Any], requested: dict[str, Any], run: str) -> None:
    """Raise ``RunMismatch`` naming each identity field that differs between two manifests."""
    diffs = []
    old, new = identity(existing), identity(requested)
    for k in IDENTITY_FIELDS:
        a, b = old[k], new[k]
        if _dump(a) != _dump(b):
            diffs += _differences(k, a, b)
    fix = "rerun with the stored arguments to resume"
    old, new = batching_identity(existing), batching_identity(requested)
    if old is not None and new is not None and old != new:
        names = {"mode": "batching", "batch_size": "batch size"}
        diffs += [f"{names[k]}: stored {old[k]!r} vs requested {new[k]!r}" for k in old if old[k] != new[k]]
        fix = f"rerun with the stored arguments (--batching {old['mode']} --batch-size {old['batch_size']})"
    if diffs:
        raise RunMismatch(
            f"run {run} exists with different arguments ({'; '.join(diffs)}); {fix}, or pass --overwrite to "
            "start over"
        )


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _differences(name: str, a: Any, b: Any) -> list[str]:
    """``name: stored A vs requested B``; for two records, one such line per key that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted({*a, *b}, key=str)
        return [
            f"{name}.{k}: stored {_short(a.get(k))} vs requested {_short(b.get(k))}"
            for k in keys
            if _dump(a.get(k)) != _dump(b.get(k))
        ]
    return [f"{name}: stored {_short(a)} vs requested {_short(b)}"]


def _short(value: Any) -> str:
    text = _dump(value)
    return text if len(text) <= 80 else text[:77] + "..."
