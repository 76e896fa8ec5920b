"""Synthetic runs written through the real store writer, for analysis tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qcache import store
from qcache.store import ArraySpec, RunKey, RunSpec, RunWriter, TokenLayout


def write_run(
    root: Path,
    acts: dict[int, np.ndarray],
    lengths: np.ndarray,
    *,
    quant: str = "fp16",
    model: str = "synth",
    dataset: str = "boolq",
    activation: str = "silu",
    chunk_rows: int = 64,
    predictions: dict[str, np.ndarray] | None = None,
    labels: tuple[str, ...] = ("False", "True"),
    units: list[int] | None = None,
    overwrite: bool = False,
) -> store.Run:
    """Write ``acts`` (layer -> (tokens, neurons)) as a run; ``units`` limits which units get committed."""
    s = store.open(root, create=True) if not (root / "zarr.json").exists() else store.open(root)
    layout = TokenLayout(lengths=np.asarray(lengths), chunk_rows=chunk_rows)
    d = next(iter(acts.values())).shape[1]
    dtype = str(next(iter(acts.values())).dtype)
    manifest = {
        "model": model,
        "model_source": model,
        "quant": quant,
        "quant_config": {"quant": quant},
        "dtype": dtype,
        "layers": sorted(acts),
        "taps": ["act"],
        "attributions": None,
        "activation": activation,
        "n_neurons": d,
        "dataset": {"name": dataset, "labels": list(labels)},
        "max_length": 512,
        "chunk_rows": chunk_rows,
        "n_examples": layout.n_examples,
        "n_tokens": layout.n_tokens,
    }
    e = layout.n_examples
    preds = predictions or random_predictions(e, len(labels), seed=0)
    spec = RunSpec(
        key=RunKey(dataset, model, quant),
        manifest=manifest,
        layout=layout,
        token_ids=np.zeros(layout.n_tokens, np.int32),
        gold=preds["gold"].astype(np.int16),
        n_truncated=np.zeros(e, np.int32),
        arrays=tuple(ArraySpec(f"layers/L{n:03d}/activations", d, dtype) for n in sorted(acts)),
    )
    w = RunWriter.open(s, spec, overwrite=overwrite)
    for u in units if units is not None else range(layout.n_units):
        r0, r1 = layout.unit_rows(u)
        own = np.flatnonzero(layout.owner_units == u)
        cols = {"example_id": own.astype(np.int32), **{k: v[own] for k, v in preds.items()}}
        w.write_unit(u, {f"layers/L{n:03d}/activations": a[r0:r1] for n, a in acts.items()}, cols)
    return s.run(spec.key)


def random_predictions(n: int, k: int, seed: int) -> dict[str, np.ndarray]:
    """Prediction columns with the store's schema and consistent readings."""
    rng = np.random.default_rng(seed)
    raw = rng.dirichlet(np.ones(k + 1), size=n)[:, :k].astype(
        np.float32
    )  # label mass < 1: the rest of the vocab
    norm = raw / raw.sum(axis=1, keepdims=True)
    gold = rng.integers(0, k, n).astype(np.int16)
    pred = norm.argmax(axis=1).astype(np.int16)
    top_prob = np.maximum(raw.max(axis=1), rng.uniform(0, 1, n).astype(np.float32))
    return {
        "gold": gold,
        "label_prob": raw,
        "label_prob_norm": norm,
        "pred_label": pred,
        "confidence": norm.max(axis=1),
        "correct": pred == gold,
        "top_token_id": rng.integers(0, 100, n).astype(np.int32),
        "top_token": np.array(["x"] * n, dtype=object),
        "top_token_prob": top_prob,
        "correct_vocab": rng.uniform(size=n) < top_prob,
    }
