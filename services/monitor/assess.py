"""What one monitoring run computes: feature drift, prediction drift and online quality.

The serving window (impressions of the recent past, with point-in-time features and delayed
labels, built by the feature service) is joined with the ranker's impression log to learn which
variant and model version served each slot and with which score.

Reference: every model version is compared with *its own first window of serving* that starts
once it has served for `windows.baseline_warmup` (its baseline), not with its training data. A
closed loop changes its own data: the ranker shows other items than the policy that produced the
training set, which moves item and user features although the world did not move at all, until
the longest feature window is filled with the new policy's traffic. Against its own settled
serving baseline, only the world's changes remain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.monitor.stats import KsResult, categorical_psi, distinct_count, ks_drift, psi
from shared.config import MonitoringConfig
from shared.evaluation import auc, reliability
from shared.world import World

NOT_ENOUGH = "insufficient_data"
WARMING_UP = "warming_up"
"""The champion serves, but not yet long enough for its reference window (no drift judged yet)."""


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
    ctr_ratio: float  # clicks / clicks the oracle's own feeds (best of the live catalog) would expect


@dataclass
class Assessment:
    run_id: str
    window: dict[str, Any]
    status: str  # ok | insufficient_data | warming_up | baseline_established
    impressions: int
    champion_version: int | None
    features: list[FeatureDrift] = field(default_factory=list)
    prediction_psi: dict[str, float] = field(default_factory=dict)  # "variant/version" -> PSI
    prediction_significant: dict[str, bool] = field(default_factory=dict)  # KS at the items' count
    quality: list[QualityFigures] = field(default_factory=list)
    baseline_ctr_ratio: float | None = None
    baseline_clicks: int = 0  # behind the ratio: its uncertainty matters as much as the window's
    baseline_expected_clicks: float = 0.0
    ctr_shortfall_p: float | None = None  # one-sided p of the champion's ratio being below the baseline's
    alerts: list[dict[str, Any]] = field(default_factory=list)

    def champion_quality(self) -> QualityFigures | None:
        return next((q for q in self.quality if q.model_version == self.champion_version), None)

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
    # the examples carry position as a dense (float) feature; the log as the slot index
    position_type = examples.schema.field("position").type
    served = served.set_column(1, "position", pc.cast(served["position"], position_type))
    return examples.join(served, keys=["request_id", "position"], join_type="inner")


def sample(table: pa.Table, rows: int, seed: int = 0) -> pa.Table:
    if table.num_rows <= rows:
        return table
    take = np.sort(np.random.default_rng(seed).choice(table.num_rows, rows, replace=False))
    return table.take(pa.array(take))


def entity_column(feature: str) -> str:
    """Whose property a feature is: its sample has one independent observation per such entity."""
    for prefix, column in (("user_", "user_id"), ("creator_", "creator_id")):
        if feature.startswith(prefix):
            return column
    return "item_id"  # item_*, item_age_log and the rest describe the item shown


def ks_at_entity_size(
    reference: pa.Table, current: pa.Table, column: str, entity: str, config: MonitoringConfig
) -> KsResult:
    """KS of one column, tested at the number of distinct entities behind each sample."""
    return ks_drift(
        reference[column].to_numpy().astype(np.float64),
        current[column].to_numpy().astype(np.float64),
        config.drift.ks_alpha,
        config.drift.ks_min_effect,
        (distinct_count(reference[entity].to_numpy()), distinct_count(current[entity].to_numpy())),
    )


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
        ks = ks_at_entity_size(reference, current, name, entity_column(name), config)
        limits = cfg.thresholds(name)
        level = "ok"
        # PSI alone is noisy when a few dozen items fill a window: an alert also needs the KS
        # test, at the sample's real size (its distinct entities), to find a non-trivial change
        if value >= limits.psi_alert and ks.drifted:
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
    """Expected clicks had the oracle built each served feed: the same user, time and number of
    slots, the best items of the whole live catalog in the best order.

    Against this, a model's clicks measure what it chose as well as how it ordered it: a model
    that keeps showing topics which went out of fashion loses here, even when it orders its own
    picks well."""
    requests = pc.dictionary_encode(part["request_id"]).combine_chunks().indices.to_numpy()
    users, ts = part["user_id"].to_numpy(), part["ts"].to_numpy()
    slots = np.bincount(requests)
    first = np.full(slots.size, -1)
    first[requests[::-1]] = np.arange(requests.size)[::-1]  # a row of each request
    max_age_ms = int(world.config.traffic.candidate_max_age.total_seconds() * 1000)
    examination = world.examination(np.arange(int(slots.max())))
    expected = 0.0
    for request, row in enumerate(first):
        at = int(ts[row])
        catalog = world.published_items(at, max_age_ms)
        relevance = world.relevance(np.full(catalog.size, users[row]), catalog, np.full(catalog.size, at))
        k = int(slots[request])
        best = (
            np.sort(np.partition(relevance, relevance.size - k)[-k:])[::-1]
            if relevance.size > k
            else (np.sort(relevance)[::-1])
        )
        expected += float(np.sum(examination[: best.size] * best))
    return expected
