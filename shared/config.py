"""Typed YAML configuration with profiles.

Each file under `config/` holds a base document and an optional `profiles:` mapping of partial
overrides (`tiny` for tests, `bench` for benchmarks, ...). The selected profile is deep-merged
over the base and the result validated by a pydantic model that forbids unknown fields, so a typo
in a knob fails at start-up instead of being silently ignored.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> Any:
    """Accept '90s', '15m', '1h', '7d' (and plain seconds) so configs read like prose."""
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match and value.strip().startswith("P"):
            return value  # ISO 8601 (what model_dump(mode="json") writes): pydantic parses it
        if not match:
            raise ValueError(f"invalid duration {value!r}: use a number and one of ms, s, m, h, d, w")
        number, unit = match.groups()
        return timedelta(seconds=float(number) * _UNIT_SECONDS[unit])
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


def format_duration(value: timedelta) -> str:
    """Inverse of parse_duration for the largest exact unit ('1d', '90m', '1500ms')."""
    ms = round(value.total_seconds() * 1000)
    for unit in ("d", "h", "m", "s"):
        size = round(_UNIT_SECONDS[unit] * 1000)
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("duration must be positive")
    return value


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps in config must carry a timezone, e.g. 2026-01-01T00:00:00Z")
    return value.astimezone(UTC)


Duration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data.yaml


class WorldConfig(StrictModel):
    """Who and what exists in the simulated world."""

    start: UtcDatetime
    horizon: Duration = Field(description="how long the world lives after start (backfill + live)")
    pre_existing: Duration = Field(description="items published this long before start exist at start")
    n_users: int = Field(gt=0)
    n_topics: int = Field(ge=2)
    n_creators: int = Field(gt=0)
    n_items: int = Field(gt=0)
    cold_start_share: Probability = Field(description="share of users who join during the horizon")
    taste_concentration: float = Field(gt=0, description="Dirichlet concentration of user tastes")
    topic_zipf: float = Field(ge=0)
    creator_zipf: float = Field(ge=0)
    creator_main_topic_share: Probability
    item_quality_sd: float = Field(ge=0)
    creator_quality_sd: float = Field(ge=0)
    sessions_per_user_day: float = Field(gt=0, description="mean activity; per-user rates are lognormal")
    activity_sigma: float = Field(ge=0)


class ClickModelConfig(StrictModel):
    """The ground truth: P(click | user, item, position, time) and the secondary signals."""

    base_logit: float
    taste_weight: float = Field(ge=0)
    quality_weight: float = Field(ge=0)
    topic_popularity_weight: float = Field(ge=0)
    age_weight: float = Field(ge=0)
    age_half_life: Duration
    position_bias: float = Field(ge=0, description="examination(p) = (1 + p) ** -position_bias")
    click_delay_mean: Duration
    dwell_log_mean: float
    dwell_log_sd: float = Field(ge=0)
    dwell_relevance_weight: float
    like_base_logit: float
    like_weight: float
    hide_base_logit: float
    hide_weight: float


class TrafficConfig(StrictModel):
    """How the baseline (logging) policy fills feeds while the simulator generates history."""

    policy: Literal["popularity", "random"]
    feed_size: int = Field(gt=0)
    candidate_pool: int = Field(gt=0)
    candidate_max_age: Duration
    exploration: Probability
    popularity_half_life: Duration
    diurnal_amplitude: Probability
    chunk: Duration = Field(description="simulation step; popularity is updated between steps")


class ClockConfig(StrictModel):
    """The world's own clock: sim time runs `speedup` times faster than wall time once live."""

    speedup: float = Field(gt=0)


class TasteShiftDrift(StrictModel):
    starts_after: Duration | None = None
    share: Probability = 0.5


class NewItemCohortDrift(StrictModel):
    starts_after: Duration | None = None
    n_items: int = Field(ge=0, default=0)
    spread: Duration = timedelta(hours=6)
    quality_boost: float = 1.0
    topic: int = Field(ge=0, default=0)


class TopicPopularityDrift(StrictModel):
    starts_after: Duration | None = None
    rising_topics: list[int] = Field(default_factory=list)
    falling_topics: list[int] = Field(default_factory=list)
    delta_logit: float = 1.0


class CtrShiftDrift(StrictModel):
    starts_after: Duration | None = None
    delta_logit: float = 0.0


class FreshnessShiftDrift(StrictModel):
    """Users start to care much more about how new an item is (a news event, a product change)."""

    starts_after: Duration | None = None
    age_weight_delta: float = 0.0


class DriftConfig(StrictModel):
    """Each knob is off until `starts_after` (a duration after world.start) is set."""

    taste_shift: TasteShiftDrift = TasteShiftDrift()
    new_item_cohort: NewItemCohortDrift = NewItemCohortDrift()
    topic_popularity: TopicPopularityDrift = TopicPopularityDrift()
    ctr_shift: CtrShiftDrift = CtrShiftDrift()
    freshness_shift: FreshnessShiftDrift = FreshnessShiftDrift()


class BackfillConfig(StrictModel):
    days: int = Field(gt=0, description="simulated days generated before the live clock starts")
    batch_events: int = Field(gt=0, description="events per ingest batch")


class ValidationConfig(StrictModel):
    """Event validation limits (see shared/validation.py for the rules that use them)."""

    max_position: int = Field(gt=0)
    max_dwell: Duration
    max_future_skew: Duration
    max_id: int = Field(gt=0)
    max_event_id_length: int = Field(gt=0)
    max_quarantine_share: Probability = Field(description="an etl window with more fails validation")


class ServedDrainConfig(StrictModel):
    """The impression-log drain (fr:served -> lake/served): one stable consumer identity, so a
    recreated container finds its own pending entries, and orphans of any other are claimed."""

    consumer: str = Field(min_length=1, description="consumer name in the group (stable across restarts)")
    batch: int = Field(gt=0, description="stream entries per lake file")
    block: Duration = Field(description="wall: how long one read waits for new entries")
    claim_idle: Duration = Field(description="wall: a pending entry idle this long is claimed (XAUTOCLAIM)")
    every: Duration = Field(
        description="wall: at most one lake file per this interval (fewer, larger files for the readers)"
    )


class IngestConfig(StrictModel):
    max_batch_events: int = Field(gt=0, description="HTTP batches above this get 413")
    max_body_bytes: int = Field(gt=0)
    stream_maxlen: int = Field(gt=0, description="approximate cap on stream entries (chunks)")
    stream_chunk_events: int = Field(gt=0)
    dedup_ttl: Duration = Field(description="how long event ids are remembered for duplicate detection")
    claim_ttl: Duration = Field(
        description="wall: an event id claimed by a batch that is not yet in the lake is held this long; "
        "after that another batch may take it over (unless the lake shows the first one stored it)"
    )
    reports_maxlen: int = Field(gt=0)
    served_drain: ServedDrainConfig


class FeatureConfig(StrictModel):
    windows: list[Duration] = Field(min_length=1)
    long_window: Duration = Field(description="window of the slow signals: creator, likes, hides, affinity")
    recent_taste_window: Duration = Field(
        description="the user's recent interest per topic, beside the long view"
    )
    prior_ctr: Probability
    prior_strength: float = Field(gt=0)
    prior_like_rate: Probability
    prior_hide_rate: Probability
    affinity_strength: float = Field(gt=0)
    position_discount: float = Field(
        ge=0, description="exposure weight of an impression at position p is (1 + p) ** -position_discount"
    )
    label_window: Duration = Field(description="a click this long after its impression still counts")

    @model_validator(mode="after")
    def _windows_sorted_unique(self) -> FeatureConfig:
        if sorted(set(self.windows)) != list(self.windows):
            raise ValueError("features.windows must be strictly increasing")
        return self


class DatasetConfig(StrictModel):
    span: Duration = Field(description="examples come from the last `span` before the watermark")
    validation: Duration
    test: Duration
    min_rows: int = Field(gt=0)
    label_rate_min: Probability
    label_rate_max: Probability
    max_orphan_click_share: Probability


class OnlineStoreConfig(StrictModel):
    ttl: Duration = Field(description="snapshot keys expire unless a newer snapshot refreshes them")
    superseded_ttl: Duration = Field(description="grace period of the previous snapshot after a swap")
    write_chunk: int = Field(gt=0)
    catalog_max_age: Duration = Field(
        description="sim: items published longer ago leave the catalog hash and the fresh pool "
        "(snapshots carry them)"
    )
    catalog_max_items: int = Field(gt=0, description="hard cap of the catalog hash and the fresh pool")


class RedisClientConfig(StrictModel):
    """Every Redis client (shared.connections): a stalled Redis fails a call, never hangs it."""

    socket_timeout: Duration = Field(description="wall: longest wait for one reply")
    connect_timeout: Duration = Field(description="wall: longest wait for a connection")
    health_check_interval: Duration = Field(description="wall: idle connections are pinged before reuse")


class HttpConfig(StrictModel):
    """Limits every HTTP service applies before its handlers run (shared.http_guard)."""

    body_timeout: Duration = Field(description="wall: a request body not complete by then is a 408")
    max_body_bytes: int = Field(gt=0, description="services without a limit of their own (monitor)")


class RealtimeConfig(StrictModel):
    """Near-real-time signals kept from the event stream (engaged items, trending pools)."""

    consumer_group: str
    read_count: int = Field(gt=0)
    block: Duration
    engaged_ttl: Duration
    popularity_bucket: Duration
    popularity_buckets: int = Field(gt=0)
    bucket_ttl: Duration


class RetryConfig(StrictModel):
    max: int = Field(ge=0)
    backoff: list[int] = Field(description="seconds before each retry; the last repeats")


class StepConfig(StrictModel):
    timeout: Duration
    retry: RetryConfig


class PipelineConfig(StrictModel):
    steps: dict[str, StepConfig]
    schedule_every: Duration | None = Field(
        description="wall time between scheduled runs (data: online-store refreshes); null = off"
    )
    result_ttl: Duration
    lock_ttl: Duration


class QueueNames(StrictModel):
    ingest: str
    features: str
    training: str
    monitoring: str


class DataConfig(StrictModel):
    """config/data.yaml: the world, ingest, features and the etl pipeline."""

    seed: int
    world: WorldConfig
    click_model: ClickModelConfig
    traffic: TrafficConfig
    clock: ClockConfig
    drift: DriftConfig
    backfill: BackfillConfig
    validation: ValidationConfig
    ingest: IngestConfig
    features: FeatureConfig
    dataset: DatasetConfig
    online_store: OnlineStoreConfig
    realtime: RealtimeConfig
    queues: QueueNames
    pipeline: PipelineConfig
    redis: RedisClientConfig
    http: HttpConfig

    @model_validator(mode="after")
    def _blocking_reads_fit_the_socket_timeout(self) -> DataConfig:
        blocking = {
            "realtime.block": self.realtime.block,
            "ingest.served_drain.block": self.ingest.served_drain.block,
        }
        for name, block in blocking.items():
            if block >= self.redis.socket_timeout:
                raise ValueError(
                    f"{name} must be shorter than redis.socket_timeout (a blocked read is not a stall)"
                )
        return self

    @property
    def live_start(self) -> datetime:
        """Sim time at which the backfilled history ends and the live clock begins."""
        return self.world.start + timedelta(days=self.backfill.days)


# --------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge mappings recursively; lists and scalars in the override replace the base."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ConfigError(ValueError):
    """A config file is missing, malformed, or names an unknown profile."""


def load_document(path: Path, profile: str) -> dict[str, Any]:
    """Read one YAML file and apply the named profile's overrides ('default' = none)."""
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    profiles = document.pop("profiles", None) or {}
    if profile == "default":
        return document
    if profile not in profiles:
        known = ", ".join(["default", *profiles]) or "default"
        raise ConfigError(f"{path}: unknown profile {profile!r} (known: {known})")
    return deep_merge(document, profiles[profile] or {})


def load_config(model: type[M], path: Path, profile: str, overrides: dict[str, Any] | None = None) -> M:
    """Load, merge and validate; `overrides` lets tests and CLIs tweak a knob without a new file."""
    document = load_document(path, profile)
    if overrides:
        document = deep_merge(document, overrides)
    return model.model_validate(document)


@cache
def load_data_config(config_dir: Path, profile: str) -> DataConfig:
    return load_config(DataConfig, config_dir / "data.yaml", profile)


# --------------------------------------------------------------------------- model.yaml


class EmbeddingConfig(StrictModel):
    dim: int = Field(gt=0)
    min_count: int = Field(ge=1, description="ids seen fewer times in training share the 'unknown' row")
    id_dropout: Probability = Field(description="share of training rows whose ids are hidden as 'unknown'")
    columns: list[Literal["user_id", "item_id", "creator_id", "topic_id"]] = Field(
        default=["user_id", "item_id", "creator_id", "topic_id"],
        description="id columns that get a learned vocabulary; the others always read the 'unknown' row",
    )


class DlrmConfig(StrictModel):
    """Embeddings + bottom MLP on dense features, pairwise dot interactions, top MLP."""

    bottom_mlp: list[int] = Field(min_length=1)
    top_mlp: list[int] = Field(min_length=1)
    dropout: Probability


class TwoTowerConfig(StrictModel):
    """User tower and item tower meeting in a dot product (candidate retrieval later)."""

    tower_mlp: list[int] = Field(min_length=1)
    dropout: Probability


class TrainingConfig(StrictModel):
    seed: int
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    batch_size: int = Field(gt=0)
    max_epochs: int = Field(gt=0)
    patience: int = Field(ge=1, description="epochs without validation improvement before stopping")
    min_delta: float = Field(ge=0)
    device: Literal["auto", "cpu", "cuda"]
    threads: int = Field(ge=1)


class EvaluationConfig(StrictModel):
    ndcg_k: int = Field(gt=0)
    calibration_bins: int = Field(ge=2)
    popularity_window: Duration = Field(description="the baseline ranks by item clicks in this window")


class ExportConfig(StrictModel):
    opset: int = Field(ge=13)
    parity_rows: int = Field(gt=0)
    parity_tolerance: float = Field(gt=0)


class RegistryConfig(StrictModel):
    experiment: str
    model_name: str
    champion_alias: str
    challenger_alias: str


class ModelConfig(StrictModel):
    """config/model.yaml: the ranking model, its training, evaluation, export and registry."""

    architecture: Literal["dlrm", "two_tower"]
    embedding: EmbeddingConfig
    dlrm: DlrmConfig
    two_tower: TwoTowerConfig
    training: TrainingConfig
    evaluation: EvaluationConfig
    export: ExportConfig
    registry: RegistryConfig
    pipeline: PipelineConfig


@cache
def load_model_config(config_dir: Path, profile: str) -> ModelConfig:
    return load_config(ModelConfig, config_dir / "model.yaml", profile)


# --------------------------------------------------------------------------- serving.yaml


class ApiConfig(StrictModel):
    max_candidates: int = Field(gt=0)
    max_k: int = Field(gt=0)
    default_k: int = Field(gt=0)
    max_body_bytes: int = Field(gt=0, description="a larger request body is a 413 (the gateway's limit too)")


class CandidatesConfig(StrictModel):
    max: int = Field(gt=0)
    trending: int = Field(ge=0)
    fresh: int = Field(ge=0)
    per_topic: int = Field(ge=0)
    favourite_topics: int = Field(ge=0)
    refresh: Duration


class PostRankingConfig(StrictModel):
    drop_engaged: bool
    max_per_creator: int = Field(gt=0)


class AbConfig(StrictModel):
    challenger_share: Probability
    salt: str


class ServingModelsConfig(StrictModel):
    reload_interval: Duration
    retry_initial: Duration = Field(description="first wait after a failed download (doubles per failure)")
    retry_max: Duration = Field(description="longest wait between download attempts of one version")
    onnx_intra_threads: int = Field(ge=1)
    onnx_inter_threads: int = Field(ge=1)
    smoke_rows: int = Field(gt=0)
    cold_item_age: Duration


class DegradationConfig(StrictModel):
    redis_timeout: Duration
    breaker_failures: int = Field(ge=1)
    breaker_cooldown: Duration


class ImpressionLogConfig(StrictModel):
    queue_size: int = Field(gt=0)
    batch: int = Field(gt=0)
    flush_every: Duration


class TrafficSimConfig(StrictModel):
    rate: float | None = Field(
        gt=0,
        description="feed requests per second (wall); null: the world's own session rate at the clock's "
        "speed-up, so that live traffic continues the simulated history instead of flooding it",
    )
    k: int | None = Field(gt=0, description="feed length; null: the world's feed_size, as in the history")
    concurrency: int = Field(gt=0)
    catalog_every: Duration
    events_batch: int = Field(gt=0)
    flush_every: Duration


class ServingConfig(StrictModel):
    """config/serving.yaml: the ranker and the live traffic simulator."""

    api: ApiConfig
    candidates: CandidatesConfig
    post_ranking: PostRankingConfig
    ab: AbConfig
    models: ServingModelsConfig
    degradation: DegradationConfig
    impression_log: ImpressionLogConfig
    traffic: TrafficSimConfig

    @model_validator(mode="after")
    def _k_within_limits(self) -> ServingConfig:
        if self.api.default_k > self.api.max_k:
            raise ValueError("api.default_k must not exceed api.max_k")
        return self


@cache
def load_serving_config(config_dir: Path, profile: str) -> ServingConfig:
    return load_config(ServingConfig, config_dir / "serving.yaml", profile)


# --------------------------------------------------------------------------- monitoring.yaml


class MonitorWindows(StrictModel):
    serving: Duration
    label_delay: Duration
    min_impressions: int = Field(gt=0)
    reference_rows: int = Field(gt=0)
    baseline_warmup: Duration = Field(
        description="a version's reference is its first serving window after this much serving: windowed "
        "features reflect its own ranking policy only once their longest window has filled"
    )
    baseline: Duration = Field(
        description="after the warm-up, this much serving sets a version's quality level (clicks per "
        "oracle-expected click and their overdispersion) that later runs are judged against"
    )


class FeatureThresholds(StrictModel):
    psi_warning: float = Field(gt=0)
    psi_alert: float = Field(gt=0)


class DriftDetectionConfig(StrictModel):
    psi_bins: int = Field(ge=2)
    psi_warning: float = Field(gt=0)
    psi_alert: float = Field(gt=0)
    ks_alpha: Probability
    ks_min_effect: float = Field(ge=0, le=1)
    categorical: list[str]
    per_feature: dict[str, FeatureThresholds]
    prediction_psi_warning: float = Field(gt=0)
    prediction_psi_alert: float = Field(gt=0)
    alert_features: int = Field(ge=1)

    def thresholds(self, feature: str) -> FeatureThresholds:
        return self.per_feature.get(feature) or FeatureThresholds(
            psi_warning=self.psi_warning, psi_alert=self.psi_alert
        )


class QualityConfig(StrictModel):
    min_impressions: int = Field(gt=0, description="per variant and version, for the report's figures")
    ctr_ratio_drop_alert: Probability = Field(
        description="the relative fall of clicks per oracle-expected click the CUSUM is tuned to detect"
    )
    cusum_threshold: float = Field(
        gt=0, description="log-likelihood threshold of the CUSUM: sets the mean runs between false alarms"
    )
    recovery_tolerance: Probability


class AlertsConfig(StrictModel):
    stream_maxlen: int = Field(gt=0)
    webhook_timeout: Duration


class GateConfig(StrictModel):
    ndcg_margin: float
    auc_margin: float
    log_loss_tolerance: float = Field(ge=0)


RetrainTrigger = Literal["quality", "feature_drift", "prediction_drift"]


class RetrainConfig(StrictModel):
    triggers: list[RetrainTrigger] = Field(
        min_length=1, description="alert kinds that start a retrain (the others are for people to read)"
    )
    cooldown: Duration
    delay: Duration = Field(
        description="sim time from the alert to the retrain's data cut: post-change data to learn from"
    )
    window: Duration
    validation: Duration
    test: Duration
    recency_half_life: Duration | None = Field(
        description="training rows' loss weight halves per this age (null: uniform)"
    )
    candidate_timeout: Duration = Field(
        description="wall time a `candidate` alias may wait for its gate before it counts as stale"
    )
    gate: GateConfig


class AbTestConfig(StrictModel):
    """The online A/B test: a mixture SPRT on the users' click-through rates (see monitor rules)."""

    min_users: int = Field(gt=1, description="per arm, before any decision")
    alpha: Probability = Field(description="two-sided; P(promoting an equal challenger) <= alpha / 2")
    mixture_lift: float = Field(gt=0, description="relative CTR lift the test is most sensitive to")
    max_duration: Duration = Field(description="sim time; a challenger without a verdict by then is rejected")
    hide_margin: float = Field(ge=0, description="relative rise of the hide rate the guardrail tolerates")
    calibration_tolerance: float = Field(
        ge=0,
        description="top-slot observed/predicted clicks may be this much further from 1 than the champion's",
    )


class RollbackConfig(StrictModel):
    """After a promotion, the new champion is watched against the champion it replaced."""

    probation: Duration = Field(description="sim time after a promotion during which it can be rolled back")
    cooldown: Duration = Field(description="wall time after an automatic rollback without a new retrain")


class MonitoringConfig(StrictModel):
    """config/monitoring.yaml: drift, online quality, alerts, retraining and the A/B decision."""

    schedule_every: Duration
    windows: MonitorWindows
    drift: DriftDetectionConfig
    quality: QualityConfig
    alerts: AlertsConfig
    retrain: RetrainConfig
    ab: AbTestConfig
    rollback: RollbackConfig
    pipeline: PipelineConfig


@cache
def load_monitoring_config(config_dir: Path, profile: str) -> MonitoringConfig:
    return load_config(MonitoringConfig, config_dir / "monitoring.yaml", profile)
