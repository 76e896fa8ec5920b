"""Calibration metrics against an independent oracle and direct formulas."""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcache.analyze import calibration as cal
from qcache.store.errors import InvalidOption


def _oracle():
    root = Path(os.environ.get("QCACHE_ORACLES", Path(__file__).parent.parent / ".oracles"))
    path = root / "uncertainty_metrics" / "numpy" / "general_calibration_error.py"
    if not path.exists():
        pytest.skip(f"uncertainty-metrics oracle not found at {path}: run scripts/fetch-oracles.sh")
    spec = importlib.util.spec_from_file_location("um_gce", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("n", "k", "seed"), [(1000, 2, 0), (500, 4, 1), (2000, 2, 2), (30, 3, 3)])
def test_ace_agrees_with_uncertainty_metrics_when_n_is_a_multiple_of_r(n, k, seed):
    um = _oracle()
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k) * 0.7, size=n)
    labels = rng.integers(0, k, n)
    conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
    assert len(np.unique(conf)) == n  # no ties
    ref = um.gce(
        labels,
        probs,
        binning_scheme="adaptive",
        max_prob=True,
        class_conditional=False,
        norm="l1",
        num_bins=10,
    )
    for split in cal.ACE_SPLITS:  # no ties, N a multiple of R: both splits are Nixon et al.'s ranges
        assert cal.ace_top_label(conf, correct, 10, split=split) == pytest.approx(ref, abs=1e-12)
    ref_cw = um.gce(
        labels,
        probs,
        binning_scheme="adaptive",
        max_prob=False,
        class_conditional=True,
        norm="l1",
        num_bins=10,
    )
    assert cal.ace_classwise(probs, labels, 10) == pytest.approx(ref_cw, abs=1e-12)


def test_ace_by_hand():
    conf = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    correct = np.array([0, 0, 1, 0, 1, 1, 0, 1, 1, 1], float)
    # R = 2 ranges of five: acc 0.4 vs conf 0.32, acc 0.8 vs conf 0.868
    assert cal.ace_top_label(conf, correct, 2) == pytest.approx((0.08 + 0.068) / 2)


def test_ties_kept_split_never_splits_ties():
    conf = np.array([0.5] * 6 + [0.9] * 4)
    ranges = cal.equal_count_ranges(conf, 4)
    for value in np.unique(conf):
        assert len(np.unique(ranges[conf == value])) == 1
    # shuffling equal values cannot change the result
    correct = np.arange(10) % 2
    a = cal.ace_top_label(conf, correct.astype(float), 4, split="ties-kept")
    perm = np.random.default_rng(0).permutation(10)
    assert cal.ace_top_label(conf[perm], correct[perm].astype(float), 4, split="ties-kept") == pytest.approx(
        a
    )


def calculate_ace_authors(conf: np.ndarray, correct: np.ndarray, num_bins: int = 10) -> float:
    """The authors' ``calculate_ace`` (analysis_and_viz/ace.py), re-implemented on a pandas DataFrame."""
    df = pd.DataFrame({"Predicted_Token_Prob": conf, "Correct": correct.astype(bool)})
    df = df.sort_values("Predicted_Token_Prob")
    per_bin, extra = divmod(len(df), num_bins)
    total, start = 0.0, 0
    for i in range(num_bins):
        end = start + per_bin + (1 if i < extra else 0)
        part = df.iloc[start:end]
        if not part.empty:
            total += abs(part["Correct"].mean() - part["Predicted_Token_Prob"].mean())
        start = end
    return total / num_bins


ISSUE_CONF = np.array([0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.9, 0.95])
ISSUE_CORRECT = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], float)


def test_empty_ranges_weigh_one_over_r():
    # ties kept: five non-empty ranges of R = 10; the 0.8 group has accuracy 4/6
    by_hand = (0.4 + 0.7 + abs(4 / 6 - 0.8) + 0.1 + 0.05) / 10
    assert cal.ace_top_label(ISSUE_CONF, ISSUE_CORRECT, 10, split="ties-kept") == pytest.approx(
        by_hand, abs=1e-12
    )
    assert by_hand == pytest.approx(0.13833, abs=1e-5)  # not 0.2767, the mean over the non-empty ranges
    assert cal.ace_top_label(ISSUE_CONF, ISSUE_CORRECT, 10) == pytest.approx(
        calculate_ace_authors(ISSUE_CONF, ISSUE_CORRECT), abs=1e-12
    )


def test_authors_split_gives_leftovers_to_the_first_ranges():
    conf = np.random.default_rng(4).uniform(0.5, 1.0, 64)
    sizes = np.bincount(cal.authors_ranges(conf, 10), minlength=10)
    assert sizes.tolist() == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]
    correct = (np.random.default_rng(5).uniform(size=64) < 0.6).astype(float)
    assert cal.ace_top_label(conf, correct, 10) == pytest.approx(
        calculate_ace_authors(conf, correct), abs=1e-12
    )


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.sampled_from([0.3, 0.5, 0.55, 0.7, 0.8, 0.95, 1.0]), st.booleans()),
        min_size=1,
        max_size=90,
    ),
    n_ranges=st.integers(1, 15),
    jitter=st.booleans(),
)
def test_authors_split_reproduces_calculate_ace(data, n_ranges, jitter):
    """Any input, ties and N < R included, against the authors' function on a DataFrame."""
    conf = np.array([c for c, _ in data], dtype=np.float64)
    if jitter:  # some distinct values among the ties
        conf = conf + np.linspace(0, 1e-3, len(conf)) * (np.arange(len(conf)) % 3 == 0)
    correct = np.array([k for _, k in data], dtype=np.float64)
    assert cal.ace_top_label(conf, correct, n_ranges, split="authors") == pytest.approx(
        calculate_ace_authors(conf, correct, n_ranges), abs=1e-12
    )


def test_classwise_ace_weighs_every_class_and_range():
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    gold = np.array([0, 1])
    # per class two singleton ranges of R = 4: class 0 gaps 0.3 and 0.2, class 1 gaps 0.2 and 0.3
    assert cal.ace_classwise(probs, gold, 4) == pytest.approx(1.0 / (2 * 4), abs=1e-12)


def test_unknown_split_is_refused():
    with pytest.raises(InvalidOption, match="ties-kept"):
        cal.ace_top_label(ISSUE_CONF, ISSUE_CORRECT, 10, split="balanced")


def test_ece_brier_and_reliability_against_direct_formulas():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(3), size=400)
    gold = rng.integers(0, 3, 400)
    conf, correct = probs.max(1), (probs.argmax(1) == gold).astype(float)
    onehot = np.zeros_like(probs)
    onehot[np.arange(400), gold] = 1
    assert cal.brier(probs, gold) == pytest.approx(np.mean(((probs - onehot) ** 2).sum(1)))
    edges = np.linspace(0, 1, 16)
    expected = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf >= lo) & ((conf < hi) | (hi == 1.0))
        if sel.any():
            expected += sel.sum() * abs(correct[sel].mean() - conf[sel].mean())
    assert cal.ece(conf, correct) == pytest.approx(expected / 400)
    bins = cal.reliability(conf, correct)
    assert sum(b.count for b in bins) == 400


def test_perfectly_calibrated_predictions_have_small_ace():
    rng = np.random.default_rng(9)
    conf = rng.uniform(0.5, 1.0, 200_000)
    correct = (rng.uniform(size=conf.size) < conf).astype(float)
    assert cal.ace_top_label(conf, correct) < 0.01
