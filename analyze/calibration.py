"""Confidence and calibration (the paper's sections 2.1, 2.2 and 4.2) from cached predictions.

Two readings of an answer (see docs/analysis.md): ``paper`` uses the label words' probabilities
renormalized over the labels; ``authors`` uses the full-vocabulary argmax token and its probability.

Equal-count ranges and ties: examples are sorted by confidence and range ``r`` takes positions
``[r N / R, (r + 1) N / R)``; a run of equal confidences is never split, it goes whole to the range where
it starts. With no ties and ``N`` a multiple of ``R`` every range holds exactly ``N / R`` examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from qcache.store.errors import InvalidOption

READINGS = ("paper", "authors")


def equal_count_ranges(conf: np.ndarray, n_ranges: int) -> np.ndarray:
    """Range index in ``[0, n_ranges)`` of each value, equal-count with ties kept together.

    >>> equal_count_ranges(np.array([0.9, 0.1, 0.5, 0.5]), 2).tolist()
    [1, 0, 0, 0]
    """
    n = len(conf)
    order = np.argsort(conf, kind="stable")
    sorted_conf = conf[order]
    first = np.searchsorted(sorted_conf, sorted_conf, side="left")  # first position of each tie group
    ranges = np.empty(n, dtype=np.int64)
    ranges[order] = (first * n_ranges) // max(n, 1)
    return ranges


def ace_top_label(conf: np.ndarray, correct: np.ndarray, n_ranges: int = 10) -> float:
    """The authors' ACE: top-label confidence, ``R`` equal-count ranges, each non-empty range weighted 1/R."""
    ranges = equal_count_ranges(conf, n_ranges)
    gaps = [abs(correct[ranges == r].mean() - conf[ranges == r].mean()) for r in np.unique(ranges)]
    return float(np.mean(gaps))


def ace_classwise(probs: np.ndarray, gold: np.ndarray, n_ranges: int = 10) -> float:
    """Nixon et al.'s ACE: for each class k, ``R`` equal-count ranges of p_k; mean |acc - conf| over k, r.

    ``probs`` is (examples, classes); acc(r, k) is the fraction of examples in the range whose label is k.
    """
    gaps = []
    for k in range(probs.shape[1]):
        p, y = probs[:, k], (gold == k).astype(np.float64)
        ranges = equal_count_ranges(p, n_ranges)
        gaps += [abs(y[ranges == r].mean() - p[ranges == r].mean()) for r in np.unique(ranges)]
    return float(np.mean(gaps))


def ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error over equal-width confidence bins, weighted by bin size."""
    return float(
        sum(b.count * abs(b.accuracy - b.confidence) for b in reliability(conf, correct, n_bins))
    ) / len(conf)


def brier(probs: np.ndarray, gold: np.ndarray) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - [y = k])^2."""
    onehot = np.eye(probs.shape[1])[gold]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    count: int
    confidence: float
    accuracy: float


def reliability(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list[Bin]:
    """Reliability-diagram data: equal-width bins ``[lo, hi)`` (the last one closed), non-empty only."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=False), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            out.append(
                Bin(
                    edges[b],
                    edges[b + 1],
                    int(sel.sum()),
                    float(conf[sel].mean()),
                    float(correct[sel].mean()),
                )
            )
    return out


def reading_arrays(
    predictions: pa.Table, reading: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(confidence, correct, class_probs, gold)`` of one reading, from a run's predictions table."""
    if reading not in READINGS:
        raise InvalidOption(f"--reading {reading!r} is unknown: use paper or authors")
    gold = predictions["gold"].to_numpy().astype(np.int64)
    norm = np.stack(predictions["label_prob_norm"].to_numpy(zero_copy_only=False)).astype(np.float64)
    if reading == "paper":
        conf = predictions["confidence"].to_numpy().astype(np.float64)
        correct = predictions["correct"].to_numpy().astype(np.float64)
        return conf, correct, norm, gold
    conf = predictions["top_token_prob"].to_numpy().astype(np.float64)
    correct = predictions["correct_vocab"].to_numpy().astype(np.float64)
    # class-wise ACE needs per-class probabilities: the full-vocabulary label probabilities, unnormalized
    raw = np.stack(predictions["label_prob"].to_numpy(zero_copy_only=False)).astype(np.float64)
    return conf, correct, raw, gold


def calibration_metrics(
    predictions: pa.Table, *, reading: str = "paper", n_ranges: int = 10
) -> dict[str, float]:
    """Accuracy, average confidence, both ACEs, ECE and Brier of one run."""
    conf, correct, probs, gold = reading_arrays(predictions, reading)
    if len(conf) == 0:
        return {}
    return {
        "n_examples": float(len(conf)),
        "accuracy": float(correct.mean()),
        "avg_confidence": float(conf.mean()),
        "ace": ace_top_label(conf, correct, n_ranges),
        "ace_classwise": ace_classwise(probs, gold, n_ranges),
        "ece": ece(conf, correct),
        "brier": brier(probs, gold),
    }
