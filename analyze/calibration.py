"""Confidence and calibration (the paper's sections 2.1, 2.2 and 4.2) from cached predictions.

Two readings of an answer (see docs/analysis.md): ``paper`` uses the label words' probabilities
renormalized over the labels; ``authors`` uses the full-vocabulary argmax token and its probability.

Adaptive calibration error sorts examples by confidence and cuts them into ``R`` equal-count ranges. Two
range splits are kept, each a named metric:

- ``authors`` (metric ``ace``): the authors' ``calculate_ace`` (MSingh-CSE/LLM-Quantization-Effects,
  ``analysis_and_viz/ace.py``): sort by confidence with pandas' default (numpy quicksort, so the order of
  equal confidences is the sort's own), give every range ``N // R`` examples and the first ``N % R`` ranges
  one more, average ``|acc - conf|`` over the non-empty ranges and divide by ``R``.
- ``ties-kept`` (metric ``ace_ties_kept``): range ``r`` starts at sorted position ``r N / R``, but a run of
  equal confidences is never split, it goes whole to the range where it starts, so the value does not
  depend on how equal confidences happen to be ordered. Also divided by ``R``, empty ranges counting zero.

With no ties the two splits differ only in where the ``N % R`` leftover examples go; with ``N`` a multiple
of ``R`` and no ties they agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from qcache.store.errors import InvalidOption

READINGS = ("paper", "authors")
ACE_SPLITS = ("authors", "ties-kept")


def equal_count_ranges(conf: np.ndarray, n_ranges: int) -> np.ndarray:
    """Range index in ``[0, n_ranges)`` of each value, equal-count with ties kept together.

    Range ``r`` starts at sorted position ``r N / R`` (stable sort); a tie group goes whole to the range of
    its first element, so later ranges may hold fewer examples or none.

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


def authors_ranges(conf: np.ndarray, n_ranges: int) -> np.ndarray:
    """Range index of each value as the authors' ``calculate_ace`` cuts them.

    Sorted as ``DataFrame.sort_values`` sorts a float column (numpy's default quicksort, ties in the sort's
    own order); range ``i`` holds ``N // R`` examples, plus one for ``i < N % R``.

    >>> authors_ranges(np.array([0.9, 0.1, 0.5, 0.3, 0.7]), 2).tolist()
    [1, 0, 0, 0, 1]
    """
    n = len(conf)
    order = np.argsort(conf, kind="quicksort")  # what pandas' sort_values runs (nargsort, kind="quicksort")
    sizes = n // n_ranges + (np.arange(n_ranges) < n % n_ranges)
    ranges = np.empty(n, dtype=np.int64)
    ranges[order] = np.repeat(np.arange(n_ranges), sizes)
    return ranges


def range_split(conf: np.ndarray, n_ranges: int, split: str) -> np.ndarray:
    """Range index of each confidence under ``split`` (``authors`` or ``ties-kept``).

    Raises:
        InvalidOption: an unknown split or ``n_ranges < 1``.
    """
    if n_ranges < 1:
        raise InvalidOption(f"--ranges {n_ranges} must be at least 1")
    if split == "authors":
        return authors_ranges(conf, n_ranges)
    if split == "ties-kept":
        return equal_count_ranges(conf, n_ranges)
    raise InvalidOption(f"ACE split {split!r} is unknown: use one of {', '.join(ACE_SPLITS)}")


def _range_gaps(conf: np.ndarray, hits: np.ndarray, ranges: np.ndarray) -> float:
    """Sum over the non-empty ranges of ``|mean(hits) - mean(conf)|``."""
    return float(sum(abs(hits[ranges == r].mean() - conf[ranges == r].mean()) for r in np.unique(ranges)))


def ace_top_label(
    conf: np.ndarray, correct: np.ndarray, n_ranges: int = 10, *, split: str = "authors"
) -> float:
    """Top-label adaptive calibration error: ``(1/R) sum_r |acc(r) - conf(r)|``, empty ranges adding 0.

    ``conf`` and ``correct`` are ``(examples,)`` float arrays (``correct`` 0/1). ``split="authors"``
    reproduces the authors' ``calculate_ace`` exactly; ``"ties-kept"`` never splits equal confidences.

    Raises:
        InvalidOption: an unknown ``split`` or ``n_ranges < 1``.
    """
    if len(conf) == 0:
        return float("nan")
    return _range_gaps(conf, correct, range_split(conf, n_ranges, split)) / n_ranges


def ace_classwise(probs: np.ndarray, gold: np.ndarray, n_ranges: int = 10) -> float:
    """Nixon et al. (2019)'s ACE: ``(1/(K R)) sum_k sum_r |acc(r, k) - conf(r, k)|``, empty ranges adding 0.

    ``probs`` is (examples, classes) float; ``gold`` (examples,) class indices. For each class ``k`` the
    examples are cut into ``R`` equal-count ranges of ``p_k`` (ties kept together); acc(r, k) is the
    fraction of the range whose label is ``k``, conf(r, k) its mean ``p_k``.
    """
    n_classes = probs.shape[1]
    total = 0.0
    for k in range(n_classes):
        p, y = probs[:, k], (gold == k).astype(np.float64)
        total += _range_gaps(p, y, range_split(p, n_ranges, "ties-kept"))
    return total / (n_classes * n_ranges)


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
    """Accuracy, average confidence, the ACEs (both splits, class-wise), ECE and Brier of one run."""
    conf, correct, probs, gold = reading_arrays(predictions, reading)
    if len(conf) == 0:
        return {}
    return {
        "n_examples": float(len(conf)),
        "accuracy": float(correct.mean()),
        "avg_confidence": float(conf.mean()),
        "ace": ace_top_label(conf, correct, n_ranges, split="authors"),
        "ace_ties_kept": ace_top_label(conf, correct, n_ranges, split="ties-kept"),
        "ace_classwise": ace_classwise(probs, gold, n_ranges),
        "ece": ece(conf, correct),
        "brier": brier(probs, gold),
    }
