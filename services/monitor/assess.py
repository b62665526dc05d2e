"""What one monitoring run computes: feature drift, prediction drift and online quality.

The serving window (impressions of the recent past, with point-in-time features and delayed
labels, built by the feature service) is joined with the ranker's impression log to learn which
variant and model version served each slot and with which score.

Reference: every model version is compared with *its own first window of serving* (its baseline),
not with its training data. A closed loop changes its own data: the ranker shows other items than
the policy that produced the training set, which moves item and user features although the world
did not move at all. Against its own serving baseline, only the world's changes remain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.monitor.stats import categorical_psi, ks_drift, psi
from shared.config import MonitoringConfig
from shared.evaluation import auc, reliability
from shared.world import World

NOT_ENOUGH = "insufficient_data"


@dataclass
class FeatureDrift:
    feature: str
    psi: float
    ks: float | None
    ks_critical: float | None
    level: str  # ok | warning | alert


@dataclass
class QualityFigures:
    variant: str
    model_version: int
    impressions: int
    clicks: int
    ctr: float
    auc: float
    ece_top_slot: float
    oracle_auc: float
    oracle_expected_clicks: float
    ctr_ratio: float  # clicks / clicks the oracle's order of the same served items would expect


@dataclass
class Assessment:
    run_id: str
    window: dict[str, Any]
    status: str  # ok | insufficient_data | baseline_established
    impressions: int
    champion_version: int | None
    features: list[FeatureDrift] = field(default_factory=list)
    prediction_psi: dict[str, float] = field(default_factory=dict)  # "variant/version" -> PSI
    quality: list[QualityFigures] = field(default_factory=list)
    baseline_ctr_ratio: float | None = None
    alerts: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def join_served(examples: pa.Table, served: pa.Table) -> pa.Table:
    """Impressions with the serving variant, model version and score of their slot (inner join)."""
    if examples.num_rows == 0 or served.num_rows == 0:
        return (
            examples.slice(0, 0)
            .append_column("score", pa.array([], pa.float32()))
            .append_column("variant", pa.array([], pa.string()))
            .append_column("model_version", pa.array([], pa.int64()))
        )
    served = served.select(["request_id", "position", "score", "variant", "model_version"])
    return examples.join(served, keys=["request_id", "position"], join_type="inner")


def sample(table: pa.Table, rows: int, seed: int = 0) -> pa.Table:
    if table.num_rows <= rows:
        return table
    take = np.sort(np.random.default_rng(seed).choice(table.num_rows, rows, replace=False))
    return table.take(pa.array(take))


def feature_drift(
    reference: pa.Table, current: pa.Table, dense_names: tuple[str, ...], config: MonitoringConfig
) -> list[FeatureDrift]:
    cfg = config.drift
    results = []
    for name in dense_names:
        if name == "position":
            continue  # set by the ranker's slots, not by the world
        ref = reference[name].to_numpy().astype(np.float64)
        cur = current[name].to_numpy().astype(np.float64)
        value = psi(ref, cur, cfg.psi_bins)
        ks = ks_drift(ref, cur, cfg.ks_alpha, cfg.ks_min_effect)
        limits = cfg.thresholds(name)
        level = "ok"
        if value >= limits.psi_alert or (ks.drifted and value >= limits.psi_warning):
            level = "alert"
        elif value >= limits.psi_warning or ks.drifted:
            level = "warning"
        results.append(FeatureDrift(name, value, ks.statistic, ks.critical, level))
    for name in cfg.categorical:
        value = categorical_psi(reference[name].to_numpy(), current[name].to_numpy())
        limits = cfg.thresholds(name)
        level = "alert" if value >= limits.psi_alert else "warning" if value >= limits.psi_warning else "ok"
        results.append(FeatureDrift(name, value, None, None, level))
    return results


def quality(joined: pa.Table, world: World, config: MonitoringConfig, bins: int = 10) -> list[QualityFigures]:
    """Online quality per (variant, model version) on impressions whose labels are complete."""
    out: list[QualityFigures] = []
    if joined.num_rows == 0:
        return out
    variants = joined["variant"].to_numpy(zero_copy_only=False)
    versions = pc.fill_null(joined["model_version"], 0).to_numpy()
    for variant, version in sorted(set(zip(variants, versions, strict=True))):
        part = joined.filter(pa.array((variants == variant) & (versions == version)))
        if part.num_rows < config.quality.min_impressions:
            continue
        labels = part["label"].to_numpy().astype(np.float64)
        scores = part["score"].to_numpy().astype(np.float64)
        users, items = part["user_id"].to_numpy(), part["item_id"].to_numpy()
        positions, ts = part["position"].to_numpy(), part["ts"].to_numpy()
        relevance = world.relevance(users, items, ts)
        top = positions == 0
        expected = oracle_expected_clicks(part, world)
        out.append(
            QualityFigures(
                variant=str(variant),
                model_version=int(version),
                impressions=part.num_rows,
                clicks=int(labels.sum()),
                ctr=float(labels.mean()),
                auc=auc(labels, scores),
                ece_top_slot=reliability(labels[top], scores[top], bins).ece if top.any() else float("nan"),
                oracle_auc=auc(labels, relevance),
                oracle_expected_clicks=expected,
                ctr_ratio=float(labels.sum()) / max(expected, 1e-9),
            )
        )
    return out


def oracle_expected_clicks(part: pa.Table, world: World) -> float:
    """Expected clicks had the oracle ordered each served feed's own items (same slots, best order)."""
    requests = pc.dictionary_encode(part["request_id"]).combine_chunks().indices.to_numpy()
    users, items, ts = part["user_id"].to_numpy(), part["item_id"].to_numpy(), part["ts"].to_numpy()
    relevance = world.relevance(users, items, ts)
    order = np.lexsort((-relevance, requests))
    sorted_requests = requests[order]
    starts = np.flatnonzero(np.r_[True, sorted_requests[1:] != sorted_requests[:-1]])
    rank = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
    return float(np.sum(world.examination(rank) * relevance[order]))
