"""Our metric implementations agree with scikit-learn on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import ndcg_score, roc_auc_score

from shared.evaluation import auc, average_ranks, lift_share, log_loss, ndcg_at_k, reliability

SEEDS = range(5)


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(2000) < 0.1
    scores = rng.random(2000) + labels * rng.random(2000) * 0.5
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_handles_ties_like_sklearn() -> None:
    rng = np.random.default_rng(9)
    labels = rng.random(500) < 0.3
    scores = rng.integers(0, 5, 500).astype(float)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_needs_both_classes() -> None:
    assert np.isnan(auc(np.zeros(5), np.arange(5)))


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize("seed", SEEDS)
def test_log_loss_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(1000) < 0.2).astype(int)
    probabilities = rng.uniform(0.01, 0.99, 1000)
    assert log_loss(labels, probabilities) == pytest.approx(sk_log_loss(labels, probabilities), rel=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 5, 10])
def test_ndcg_matches_sklearn_per_request_mean(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 25, 60)
    groups = np.repeat(np.arange(sizes.size), sizes)
    labels = (rng.random(groups.size) < 0.15).astype(float)
    scores = rng.random(groups.size)  # continuous: no ties
    shuffle = rng.permutation(groups.size)  # rows of a request need not be contiguous
    expected = np.mean(
        [
            ndcg_score([labels[groups == g]], [scores[groups == g]], k=k)
            for g in np.unique(groups)
            if labels[groups == g].sum() > 0
        ]
    )
    assert ndcg_at_k(groups[shuffle], labels[shuffle], scores[shuffle], k) == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_ndcg_averages_over_ties_like_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(40), 12)
    labels = (rng.random(groups.size) < 0.2).astype(float)
    scores = rng.integers(0, 3, groups.size).astype(float)  # heavy ties
    expected = np.mean(
        [
            ndcg_score([labels[groups == g]], [scores[groups == g]], k=5)
            for g in range(40)
            if labels[groups == g].sum()
        ]
    )
    assert ndcg_at_k(groups, labels, scores, 5) == pytest.approx(expected, abs=1e-12)


def test_ndcg_does_not_reward_input_order_among_ties() -> None:
    groups = np.zeros(4)
    labels = np.array([1.0, 0, 0, 0])
    constant = np.zeros(4)
    assert ndcg_at_k(groups, labels, constant, 10) == ndcg_at_k(groups, labels[::-1], constant, 10)


def test_ndcg_of_the_ideal_order_is_one() -> None:
    groups = np.array([0, 0, 0, 1, 1])
    labels = np.array([0, 1, 1, 1, 0])
    assert ndcg_at_k(groups, labels, labels + 0.0, 10) == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_reliability_matches_sklearn_calibration_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    probabilities = rng.random(3000)
    labels = (rng.random(3000) < probabilities**1.5).astype(int)
    curve = reliability(labels, probabilities, bins=10)
    observed, predicted = calibration_curve(labels, probabilities, n_bins=10, strategy="uniform")
    filled = curve.counts > 0
    np.testing.assert_allclose(curve.observed_rate[filled], observed, atol=1e-12)
    np.testing.assert_allclose(curve.mean_predicted[filled], predicted, atol=1e-12)


def test_ece_is_zero_when_calibrated_and_large_when_not() -> None:
    p = np.repeat([0.1, 0.5, 0.9], 1000)
    y = np.concatenate([np.arange(1000) < 100, np.arange(1000) < 500, np.arange(1000) < 900]).astype(float)
    assert reliability(y, p, 10).ece == pytest.approx(0.0, abs=1e-12)
    assert reliability(y, np.clip(p + 0.2, 0, 1), 10).ece == pytest.approx(0.2, abs=0.05)


def test_lift_share() -> None:
    assert lift_share(model=0.7, baseline=0.6, oracle=0.8) == pytest.approx(0.5)
    assert np.isnan(lift_share(0.5, 0.5, 0.5))
