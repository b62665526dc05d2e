"""Evaluation on the time-held-out test set, against the oracle and a popularity baseline.

Ranking metrics (AUC, NDCG@k per request) score every candidate as if shown at the top
(position 0): a ranker decides the order, so it must not get credit for knowing where the logging
policy happened to put an item. Probability metrics (log loss, calibration) use the position the
item was actually shown at, because that is what the label measured. The oracle is the simulated
world itself: its true relevance for ranking, its true P(click | position) for probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from services.trainer.data import Split
from services.trainer.training import predict
from shared.config import ModelConfig
from shared.evaluation import Reliability, auc, lift_share, log_loss, ndcg_at_k, reliability
from shared.features import FeatureSpec
from shared.world import World


@dataclass(frozen=True)
class Scores:
    """One scorer's view of the test set."""

    ranking: np.ndarray  # sorts candidates (position-free)
    probability: np.ndarray  # P(click) at the served position


@dataclass
class EvaluationReport:
    metrics: dict[str, dict[str, float]]  # scorer -> metric -> value
    lift: dict[str, float]  # metric -> (model - popularity) / (oracle - popularity)
    reliability: dict[str, Reliability] = field(default_factory=dict)
    scores: dict[str, Scores] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """MLflow-friendly: test_model_auc, test_oracle_ndcg_at_10, lift_ndcg_at_10, ..."""
        out = {
            f"test_{scorer}_{name}": value for scorer, m in self.metrics.items() for name, value in m.items()
        }
        out.update({f"lift_{name}": value for name, value in self.lift.items()})
        return out

    def summary(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "lift": self.lift}


def model_scores(model: nn.Module, split: Split, position_column: int) -> Scores:
    return Scores(
        ranking=predict(model, split.with_position(0, position_column), split.ids),
        probability=predict(model, split.dense, split.ids),
    )


def popularity_scores(
    split: Split, dense_names: tuple[str, ...], spec: FeatureSpec, window_ms: int
) -> Scores:
    """Recent clicks rank; the smoothed item CTR of the same window is its probability."""
    label = spec.window_label(window_ms)
    clicks = split.dense[:, dense_names.index(f"item_clicks_log_{label}")]
    ctr = split.dense[:, dense_names.index(f"item_ctr_{label}")]
    return Scores(ranking=clicks.astype(np.float64), probability=ctr.astype(np.float64))


def oracle_scores(split: Split, world: World) -> Scores:
    users, items = split.ids["user_id"], split.ids["item_id"]
    known = (users >= 0) & (users < world.n_users) & (items >= 0) & (items < world.n_items)
    if not known.all():
        raise ValueError("the test set names users or items the simulated world does not have")
    return Scores(
        ranking=world.relevance(users, items, split.ts),
        probability=world.click_probability(users, items, split.position, split.ts),
    )


def metrics_of(split: Split, scores: Scores, config: ModelConfig) -> tuple[dict[str, float], Reliability]:
    k = config.evaluation.ndcg_k
    curve = reliability(split.labels, scores.probability, config.evaluation.calibration_bins)
    return (
        {
            "auc": auc(split.labels, scores.ranking),
            f"ndcg_at_{k}": ndcg_at_k(split.requests, split.labels, scores.ranking, k),
            "log_loss": log_loss(split.labels, scores.probability),
            "ece": curve.ece,
            "mean_probability": float(np.mean(scores.probability)),
            "label_rate": float(np.mean(split.labels)),
        },
        curve,
    )


def evaluate(
    model: nn.Module,
    test: Split,
    dense_names: tuple[str, ...],
    spec: FeatureSpec,
    world: World,
    config: ModelConfig,
) -> EvaluationReport:
    window_ms = int(config.evaluation.popularity_window.total_seconds() * 1000)
    all_scores = {
        "model": model_scores(model, test, dense_names.index("position")),
        "popularity": popularity_scores(test, dense_names, spec, window_ms),
        "oracle": oracle_scores(test, world),
    }
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, Reliability] = {}
    for name, scores in all_scores.items():
        metrics[name], curves[name] = metrics_of(test, scores, config)
    k = config.evaluation.ndcg_k
    lift = {
        metric: lift_share(metrics["model"][metric], metrics["popularity"][metric], metrics["oracle"][metric])
        for metric in ("auc", f"ndcg_at_{k}")
    }
    return EvaluationReport(metrics, lift, curves, all_scores)
