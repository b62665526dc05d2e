"""What one monitoring run computes: feature drift, prediction drift and online quality.

The serving window (impressions of the recent past, with point-in-time features and delayed
labels, built by the feature service) is joined with the ranker's impression log to learn which
variant and model version served each slot and with which score.

Reference: every champion is compared with *its own serving* once it has served for
`windows.baseline_warmup`: its quality level over the next `windows.baseline` of serving, and its
feature and score distributions in that period (its drift reference), not with its training data.
A closed loop changes its own data: the ranker shows other items than the policy that produced
the training set, which moves item and user features although the world did not move at all,
until the longest feature window is filled with the new policy's traffic. Against its own
settled serving, only the world's changes remain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.monitor import alerts
from services.monitor.rules import (
    ArmSample,
    ChampionTrack,
    QualityBaseline,
    RequestSample,
    TrackUpdate,
    advance_track,
)
from services.monitor.stats import KsResult, categorical_psi, distinct_count, ks_drift, psi
from shared.config import MonitoringConfig
from shared.evaluation import auc, reliability
from shared.timeutil import duration_ms, iso
from shared.world import World

NOT_ENOUGH = "insufficient_data"
WARMING_UP = "warming_up"
"""The champion serves, but not yet long enough for its reference window (no drift judged yet)."""
MEASURING_BASELINE = "baseline"
"""Warmed up; the champion's quality level is being measured (no quality judged yet)."""
BASELINE_ESTABLISHED = "baseline_established"


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
    requests: int
    users: int
    clicks: int
    ctr: float
    auc: float
    ece_top_slot: float
    oracle_auc: float
    oracle_expected_clicks: float
    ctr_ratio: float  # clicks / clicks the oracle's own feeds (best of the live catalog) would expect
    ctr_ratio_se: float  # its standard error, from per-user sums


@dataclass
class Assessment:
    run_id: str
    window: dict[str, Any]
    status: str  # ok | insufficient_data | warming_up | baseline | baseline_established
    impressions: int
    champion_version: int | None
    features: list[FeatureDrift] = field(default_factory=list)
    prediction_psi: dict[str, float] = field(default_factory=dict)  # "variant/version" -> PSI
    prediction_significant: dict[str, bool] = field(default_factory=dict)  # KS at the items' count
    quality: list[QualityFigures] = field(default_factory=list)
    baseline: dict[str, Any] | None = None  # the champion's QualityBaseline
    baseline_ctr_ratio: float | None = None
    quality_look: dict[str, Any] | None = None  # this run's CUSUM look (QualityLook)
    rollback_look: dict[str, Any] | None = None  # during a promotion's probation
    alerts: list[dict[str, Any]] = field(default_factory=list)

    def champion_quality(self) -> QualityFigures | None:
        return next(
            (
                q
                for q in self.quality
                if q.model_version == self.champion_version and q.variant == CHAMPION_VARIANT
            ),
            None,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CHAMPION_VARIANT = "champion"
"""The ranker's variant name for the champion's share of traffic (its `served` records)."""


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


def window_parts(joined: pa.Table) -> dict[tuple[str, int], pa.Table]:
    """The window's rows per (variant, model version) that served them."""
    if joined.num_rows == 0:
        return {}
    variants = joined["variant"].to_numpy(zero_copy_only=False)
    versions = pc.fill_null(joined["model_version"], 0).to_numpy()
    return {
        (str(variant), int(version)): joined.filter(pa.array((variants == variant) & (versions == version)))
        for variant, version in sorted(set(zip(variants, versions, strict=True)))
    }


def quality(
    parts: dict[tuple[str, int], pa.Table],
    requests: dict[tuple[str, int], RequestSample],
    world: World,
    config: MonitoringConfig,
    bins: int = 10,
) -> list[QualityFigures]:
    """Online quality per (variant, model version) on impressions whose labels are complete."""
    out: list[QualityFigures] = []
    for (variant, version), part in parts.items():
        if part.num_rows < config.quality.min_impressions:
            continue
        labels = part["label"].to_numpy().astype(np.float64)
        scores = part["score"].to_numpy().astype(np.float64)
        users, items = part["user_id"].to_numpy(), part["item_id"].to_numpy()
        positions, ts = part["position"].to_numpy(), part["ts"].to_numpy()
        relevance = world.relevance(users, items, ts)
        top = positions == 0
        per_user = requests[(variant, version)].by_user()
        out.append(
            QualityFigures(
                variant=variant,
                model_version=version,
                impressions=part.num_rows,
                requests=len(requests[(variant, version)]),
                users=per_user.clusters,
                clicks=int(labels.sum()),
                ctr=float(labels.mean()),
                auc=auc(labels, scores),
                ece_top_slot=reliability(labels[top], scores[top], bins).ece if top.any() else float("nan"),
                oracle_auc=auc(labels, relevance),
                oracle_expected_clicks=per_user.base,
                ctr_ratio=per_user.value,
                ctr_ratio_se=float(np.sqrt(per_user.variance())),
            )
        )
    return out


def oracle_expected_clicks(part: pa.Table, world: World) -> float:
    """Expected clicks had the oracle built each served feed (see `request_sample`)."""
    return float(request_sample(part, world).expected.sum())


def request_sample(part: pa.Table, world: World) -> RequestSample:
    """One row per served request: its user, time, clicks, and the clicks expected had the oracle
    built that feed: the same user, time and number of slots, the best items of the whole live
    catalog in the best order.

    Against this, a model's clicks measure what it chose as well as how it ordered it: a model
    that keeps showing topics which went out of fashion loses here, even when it orders its own
    picks well. Requests, not impressions, are the rows: slots of one feed are not independent."""
    if part.num_rows == 0:
        return RequestSample.empty()
    requests = pc.dictionary_encode(part["request_id"]).combine_chunks().indices.to_numpy()
    users, ts = part["user_id"].to_numpy(), part["ts"].to_numpy()
    labels = part["label"].to_numpy().astype(np.float64)
    slots = np.bincount(requests)
    clicks = np.bincount(requests, weights=labels, minlength=slots.size)
    first = np.full(slots.size, -1)
    first[requests[::-1]] = np.arange(requests.size)[::-1]  # a row of each request
    max_age_ms = int(world.config.traffic.candidate_max_age.total_seconds() * 1000)
    req_users, req_ts = users[first].astype(np.int64), ts[first].astype(np.int64)
    expected = np.zeros(slots.size)
    for lo in range(0, slots.size, _ORACLE_BLOCK):
        block = slice(lo, lo + _ORACLE_BLOCK)
        expected[block] = _oracle_feed_clicks(
            world, req_users[block], req_ts[block], slots[block], max_age_ms
        )
    return RequestSample(req_users, req_ts, clicks, expected)


_ORACLE_BLOCK = 256
"""Requests scored against the catalog at once: a (requests x items) matrix of a few MB."""


def _oracle_feed_clicks(
    world: World, users: np.ndarray, ts: np.ndarray, slots: np.ndarray, max_age_ms: int
) -> np.ndarray:
    """Expected clicks of the oracle's best feed of `slots[r]` items for each request r: the
    catalog visible at each request's time, scored for its user, top items in the best order."""
    published = world.item_published_ms
    candidates = np.flatnonzero((published <= ts.max()) & (published > ts.min() - max_age_ms))
    if candidates.size == 0:
        return np.zeros(users.size)
    relevance = world.relevance(users[:, None], candidates[None, :], ts[:, None])
    visible = (published[candidates][None, :] <= ts[:, None]) & (
        published[candidates][None, :] > ts[:, None] - max_age_ms
    )
    relevance = np.where(visible, relevance, 0.0)
    k = int(min(slots.max(), candidates.size))
    best = -np.sort(-np.partition(relevance, candidates.size - k, axis=1)[:, candidates.size - k :], axis=1)
    weights = world.examination(np.arange(k))[None, :] * (np.arange(k)[None, :] < slots[:, None])
    return np.asarray(np.sum(best * weights, axis=1))


# --------------------------------------------------------------------------- one run, end to end


@dataclass(frozen=True)
class ChampionMemory:
    """What the monitor keeps about the champion between runs (the I/O layer stores it: the
    track in Redis, the pending baseline requests and the drift reference in the lake)."""

    track: ChampionTrack | None
    pending_baseline: RequestSample
    reference: pa.Table | None


@dataclass
class WindowOutcome:
    assessment: Assessment
    memory: ChampionMemory
    new_reference: bool
    requests: dict[tuple[str, int], RequestSample]


def assess_window(
    run_id: str,
    start_ms: int,
    end_ms: int,
    joined: pa.Table,
    world: World,
    dense_names: tuple[str, ...],
    champion_version: int | None,
    memory: ChampionMemory,
    config: MonitoringConfig,
) -> WindowOutcome:
    """Drift and quality of one serving window [start, end) (labels complete up to `end`):
    figures per variant, the champion's phase, its quality CUSUM (and rollback CUSUM during a
    probation), drift against its reference, and the alerts they raise. Pure: the monitor's job
    and the loop simulator both call it."""
    window = {"start": iso(start_ms), "end": iso(end_ms)}
    parts = window_parts(joined)
    requests = {key: request_sample(part, world) for key, part in parts.items()}
    result = Assessment(run_id, window, "ok", joined.num_rows, champion_version)
    result.quality = quality(parts, requests, world, config)
    key = (CHAMPION_VARIANT, champion_version or 0)
    champion_rows = parts.get(key)
    if champion_version is None or (memory.track is None and champion_rows is None):
        result.status = NOT_ENOUGH
        return WindowOutcome(result, memory, False, requests)
    track = memory.track or ChampionTrack(
        champion_version,
        int(pc.min(champion_rows["ts"]).as_py()),  # type: ignore[index]
    )
    windows = config.windows
    warmup_ms, baseline_ms = duration_ms(windows.baseline_warmup), duration_ms(windows.baseline)
    update = advance_track(
        track, requests.get(key, RequestSample.empty()), end_ms, memory.pending_baseline, config.quality,
        warmup_ms, baseline_ms,
    )  # fmt: skip
    result.status = {
        "warming_up": WARMING_UP,
        "baseline": MEASURING_BASELINE,
    }.get(update.phase, BASELINE_ESTABLISHED if update.baseline_established else "ok")
    baseline = update.track.baseline
    if baseline is not None:
        result.baseline = asdict(baseline)
        result.baseline_ctr_ratio = baseline.ratio
    result.quality_look = asdict(update.quality) if update.quality is not None else None
    result.rollback_look = asdict(update.rollback) if update.rollback is not None else None

    reference, new_reference = memory.reference, False
    enough = champion_rows is not None and champion_rows.num_rows >= windows.min_impressions
    if champion_rows is not None and reference is None and update.baseline_established:
        settled = champion_rows.filter(pc.greater_equal(champion_rows["ts"], track.warmup_end_ms(warmup_ms)))
        reference, new_reference = sample(settled, windows.reference_rows), True
    elif champion_rows is not None and enough and reference is not None:
        current = sample(champion_rows, windows.reference_rows)
        result.features = feature_drift(reference, current, dense_names, config)
        label = f"{CHAMPION_VARIANT}/{champion_version}"
        result.prediction_psi[label] = psi(
            reference["score"].to_numpy(), current["score"].to_numpy(), config.drift.psi_bins
        )
        result.prediction_significant[label] = ks_at_entity_size(
            reference, current, "score", "item_id", config
        ).drifted
    result.alerts = alerts_for(result, update, config)
    memory = ChampionMemory(update.track, update.pending_baseline, reference)
    return WindowOutcome(result, memory, new_reference, requests)


def alerts_for(result: Assessment, update: TrackUpdate, config: MonitoringConfig) -> list[dict[str, Any]]:
    """Warnings for people, alerts for the loop. A fall of the champion's quality (its CUSUM
    alarmed) and a promotion on probation doing worse than the champion it replaced are alerts;
    drift of several features at once or of the champion's scores is an alert only when it is
    configured to start a retrain (monitoring.retrain.triggers), else a warning at level "alert":
    a closed loop moves its own distributions, and an alert that fires without a reason to act
    teaches people to ignore alerts (the loop benchmark measures how often each one fires)."""
    found: list[dict[str, Any]] = []
    cfg = config.drift
    acted_on = set(config.retrain.triggers)
    window = result.window
    drifted = [f for f in result.features if f.level == "alert"]
    for f in result.features:
        if f.level != "ok":
            threshold = cfg.thresholds(f.feature)
            found.append(
                alerts.alert(
                    "warning",
                    "feature_drift",
                    f.feature,
                    f.psi,
                    threshold.psi_alert if f.level == "alert" else threshold.psi_warning,
                    window,
                    ks=f.ks,
                    ks_critical=f.ks_critical,
                    feature_level=f.level,
                )
            )
    if len(drifted) >= cfg.alert_features:
        found.append(
            alerts.alert(
                "alert" if "feature_drift" in acted_on else "warning",
                "feature_drift",
                ",".join(f.feature for f in drifted),
                len(drifted),
                cfg.alert_features,
                window,
                level="alert",
                model_version=result.champion_version,
            )
        )
    for label, value in result.prediction_psi.items():
        if value >= cfg.prediction_psi_warning:
            level = (
                "alert"
                if value >= cfg.prediction_psi_alert and result.prediction_significant.get(label, False)
                else "warning"
            )
            severity = "alert" if level == "alert" and "prediction_drift" in acted_on else "warning"
            found.append(
                alerts.alert(
                    severity, "prediction_drift", label, value, cfg.prediction_psi_alert, window, level=level
                )
            )
    for kind, look in (("quality", update.quality), ("promotion_regression", update.rollback)):
        if look is not None and look.alarm:
            reference = update.track.baseline if kind == "quality" else update.track.rollback
            found.append(
                alerts.alert(
                    "alert",
                    kind,
                    "ctr_ratio",
                    look.ratio,
                    look.threshold,
                    window,
                    cusum=look.statistic,
                    relative_change=look.relative_change,
                    reference_ratio=(
                        reference.ratio
                        if isinstance(reference, QualityBaseline)
                        else reference.reference.ratio
                        if reference is not None
                        else None
                    ),
                    model_version=result.champion_version,
                )
            )
    for record in found:
        record["monitor_run"] = result.run_id  # the run (and its report) behind the alert
    return found


def arm_samples(served: pa.Table, engagements: pa.Table) -> dict[tuple[str, int], ArmSample]:
    """Per-user sums of each (variant, model version) in the served log: impressions, clicks and
    hides of its slots (from `engagements`, events with event_type, request_id, position), and
    the top slot's clicks and predicted P(click). The user is the randomised unit of the A/B."""
    served = served.filter(pc.is_valid(served["model_version"]))
    if served.num_rows == 0:
        return {}
    flags = []
    for kind in ("click", "hide"):
        rows = engagements.filter(pc.equal(engagements["event_type"], kind))
        slots = rows.group_by(["request_id", "position"]).aggregate([])
        flags.append(slots.append_column(kind, pa.array(np.ones(slots.num_rows, dtype=np.int8))))
    position_type = served.schema.field("position").type
    joined = served
    for flag in flags:
        typed = flag.set_column(1, "position", pc.cast(flag["position"], position_type))
        joined = joined.join(typed, keys=["request_id", "position"], join_type="left outer")
    clicked = pc.fill_null(joined["click"], 0).to_numpy().astype(np.float64)
    hidden = pc.fill_null(joined["hide"], 0).to_numpy().astype(np.float64)
    top = (joined["position"].to_numpy() == 0).astype(np.float64)
    scores = pc.fill_null(joined["score"], 0.0).to_numpy().astype(np.float64)
    users = joined["user_id"].to_numpy()
    variants = joined["variant"].to_numpy(zero_copy_only=False)
    versions = joined["model_version"].to_numpy()
    out: dict[tuple[str, int], ArmSample] = {}
    for variant, version in sorted(set(zip(variants, versions, strict=True))):
        mask = (variants == variant) & (versions == version)
        ids, inverse = np.unique(users[mask], return_inverse=True)
        sums = {
            name: np.bincount(inverse, weights=values[mask], minlength=ids.size)
            for name, values in (
                ("impressions", np.ones(users.size)),
                ("clicks", clicked),
                ("hides", hidden),
                ("top_clicks", clicked * top),
                ("top_scores", scores * top),
            )
        }
        out[(str(variant), int(version))] = ArmSample(users=ids.astype(np.int64), **sums)
    return out
