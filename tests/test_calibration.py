"""Calibration metrics against an independent oracle and direct formulas."""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from qcache.analyze import calibration as cal


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
    assert cal.ace_top_label(conf, correct, 10) == pytest.approx(ref, abs=1e-12)
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


def test_ties_are_never_split_across_ranges():
    conf = np.array([0.5] * 6 + [0.9] * 4)
    ranges = cal.equal_count_ranges(conf, 4)
    for value in np.unique(conf):
        assert len(np.unique(ranges[conf == value])) == 1
    # shuffling equal values cannot change the result
    correct = np.arange(10) % 2
    a = cal.ace_top_label(conf, correct.astype(float), 4)
    perm = np.random.default_rng(0).permutation(10)
    assert cal.ace_top_label(conf[perm], correct[perm].astype(float), 4) == pytest.approx(a)


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
