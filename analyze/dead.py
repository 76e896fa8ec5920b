"""Dead neurons (the paper's sections 2.4 and 4.4): one streaming pass per layer over the store.

A neuron is dead when every cached activation lies in ``[-threshold, threshold]`` (default 0.1, the paper's
rule for GELU/SiLU); under ReLU the paper asks for exactly 0 (``relu_eps = 0``; the authors' code used
``|a| < 1e-6``). The same pass yields per-neuron min, max, mean, std and the fraction of near-zero values.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

RELU_NAMES = ("relu",)


@dataclass(frozen=True)
class DeadRule:
    threshold: float = 0.1  # |a| <= threshold counts as near zero (non-ReLU)
    relu_eps: float = 0.0  # ReLU: dead iff every |a| <= relu_eps (0: exactly zero)

    def bound(self, activation: str) -> float:
        return self.relu_eps if activation.lower() in RELU_NAMES else self.threshold


@dataclass(frozen=True)
class NeuronStats:
    """Per-neuron statistics of one layer, each ``(neurons,)``."""

    minimum: np.ndarray
    maximum: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    frac_near_zero: np.ndarray
    dead: np.ndarray
    n_tokens: int
    n_nonfinite: np.ndarray
    bound: float


def neuron_stats_lazy(x: da.Array, bound: float) -> dict[str, da.Array]:
    """Lazy per-neuron reductions of ``x`` (tokens, neurons); computed together they read each chunk once."""
    x64 = x.astype(np.float64)
    finite = da.isfinite(x)
    clean = da.where(finite, x64, 0.0)
    near = (da.abs(x64) <= bound) & finite
    return {
        "min": da.nanmin(da.where(finite, x64, np.nan), axis=0),
        "max": da.nanmax(da.where(finite, x64, np.nan), axis=0),
        "sum": clean.sum(axis=0),
        "sumsq": (clean * clean).sum(axis=0),
        "n": finite.sum(axis=0),
        "near": near.sum(axis=0),
    }


def neuron_stats(x: da.Array, activation: str, rule: DeadRule = DeadRule()) -> NeuronStats:
    """Compute the statistics of one layer's activations ``x`` (tokens, neurons)."""
    bound = rule.bound(activation)
    (r,) = dask.compute(neuron_stats_lazy(x, bound))
    return finish_stats(r, x.shape[0], bound)


def finish_stats(r: dict[str, np.ndarray], n_tokens: int, bound: float) -> NeuronStats:
    n = np.maximum(r["n"], 1)
    mean = r["sum"] / n
    var = np.maximum(r["sumsq"] / n - mean**2, 0.0)
    # dead: every finite value within the bound, and no non-finite value at all
    dead = (r["near"] == n_tokens) & (n_tokens > 0)
    return NeuronStats(
        minimum=r["min"],
        maximum=r["max"],
        mean=mean,
        std=np.sqrt(var),
        frac_near_zero=r["near"] / max(n_tokens, 1),
        dead=dead,
        n_tokens=n_tokens,
        n_nonfinite=n_tokens - r["n"],
        bound=bound,
    )
