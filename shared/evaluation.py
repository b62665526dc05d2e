"""Ranking and calibration metrics, numpy only, so the trainer and the monitor share one definition.

Each is checked against scikit-learn on random inputs in tests/unit/test_evaluation.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-7


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (like scipy.stats.rankdata)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], sorted_values.size]
    averaged = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = averaged
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties get half credit). NaN without both classes."""
    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ndcg_at_k(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Mean NDCG@k over groups (requests) that have at least one positive label.

    Gains are the labels, discounts 1/log2(rank + 1). Tied scores share the mean gain of their tie
    (the expectation over random tie-breaking, as scikit-learn does): breaking ties by input order
    would credit a coarse score with whatever order the rows were logged in.
    """
    groups = np.asarray(groups)
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if groups.size == 0:
        return float("nan")
    _, group_index = np.unique(groups, return_inverse=True)
    dcg = _dcg(group_index, labels, scores, k)
    ideal = _dcg(group_index, labels, labels, k)
    has_positive = ideal > 0
    if not has_positive.any():
        return float("nan")
    return float(np.mean(dcg[has_positive] / ideal[has_positive]))


def _dcg(group_index: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((-scores, group_index))
    g, s, y = group_index[order], scores[order], labels[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    starts = np.flatnonzero(new_group)
    rank = np.arange(g.size) - np.repeat(starts, np.diff(np.r_[starts, g.size]))
    discount = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    tie_block = np.cumsum(new_group | np.r_[True, s[1:] != s[:-1]]) - 1
    mean_gain = np.bincount(tie_block, weights=y) / np.bincount(tie_block)
    return np.bincount(g, weights=mean_gain[tie_block] * discount, minlength=int(group_index.max()) + 1)


@dataclass(frozen=True)
class Reliability:
    """Calibration by equal-width bins of predicted probability."""

    bin_edges: np.ndarray
    mean_predicted: np.ndarray  # NaN for empty bins
    observed_rate: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: bin-size-weighted |mean predicted - observed rate|."""
        filled = self.counts > 0
        gaps = np.abs(self.mean_predicted[filled] - self.observed_rate[filled])
        return float(np.sum(gaps * self.counts[filled]) / max(self.counts.sum(), 1))


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> Reliability:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(index, weights=p, minlength=bins) / counts
        rate = np.bincount(index, weights=y, minlength=bins) / counts
    return Reliability(edges, mean_p, rate, counts)


def lift_share(model: float, baseline: float, oracle: float) -> float:
    """How much of the possible improvement over the baseline the model achieves: 1.0 = the oracle."""
    gap = oracle - baseline
    return float("nan") if abs(gap) < 1e-12 else float((model - baseline) / gap)
