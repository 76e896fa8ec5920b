"""`qcache extract` command lines shared by the tests: a model on the CPU, quiet, into one store."""

from __future__ import annotations

import sys
from pathlib import Path


def extract_args(
    model: str | Path,
    store: str | Path,
    *extra: str,
    bits: int | str = 32,
    limit: int = 4,
    quant: list[str] | None = None,
) -> list[str]:
    """Arguments of ``qcache extract`` for ``model`` at ``bits`` (or with the method options ``quant``,
    e.g. ``["--quant", "hqq4"]``, instead); ``extra`` options come last (and win)."""
    method = quant if quant is not None else ["--bits", str(bits)]
    return [
        "extract",
        *("--model", str(model), *method, "--limit", str(limit)),
        *("--device", "cpu", "--quiet", "--store", str(store)),
        *extra,
    ]


def as_process(args: list[str]) -> list[str]:
    """The same command run as its own Python process (for kill -9, locks and environment tests)."""
    return [sys.executable, "-m", "qcache.cli", *args]
