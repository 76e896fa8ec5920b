"""The manifest: everything needed to reproduce a run, and the fingerprint that guards resumes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .errors import RunMismatch

SCHEMA_VERSION = 1

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
    "prompting",
)
# Identity fields added after runs were stored, with the value a run stored without them had. A field at
# that value is left out of the fingerprint and compares equal to an absent one, so older runs keep their
# fingerprints and resume.
IDENTITY_DEFAULTS: dict[str, Any] = {"prompting": {"chat_template": False}}


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The identity fields of ``manifest``, less those at their ``IDENTITY_DEFAULTS`` value (or absent)."""
    out = {}
    for k in IDENTITY_FIELDS:
        if k in IDENTITY_DEFAULTS and manifest.get(k, IDENTITY_DEFAULTS[k]) == IDENTITY_DEFAULTS[k]:
            continue
        out[k] = manifest.get(k)
    return out


def fingerprint(manifest: dict[str, Any]) -> str:
    """Stable hash of the identity fields of a manifest."""
    ident = _identity(manifest)
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_run(existing: dict[str, Any], requested: dict[str, Any], run: str) -> None:
    """Raise ``RunMismatch`` naming each identity field that differs between two manifests."""
    diffs = []
    old, new = _identity(existing), _identity(requested)
    for k in IDENTITY_FIELDS:
        a, b = old.get(k, IDENTITY_DEFAULTS.get(k)), new.get(k, IDENTITY_DEFAULTS.get(k))
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diffs.append(f"{k}: stored {_short(a)} vs requested {_short(b)}")
    if diffs:
        raise RunMismatch(
            f"run {run} exists with different arguments ({'; '.join(diffs)}); "
            "rerun with the stored arguments to resume, or pass --overwrite to start over"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
