"""feedrank's closed loop in one process: the world, its users, the ranker, the feature snapshots,
the monitor and the retraining DAG, advancing in simulated time with no HTTP, no Redis and no
wall clock, fast enough to run the loop thousands of times.

Everything that decides is the real code: the world's ground truth and the traffic simulator's
engagement model (`services.traffic.simulator.engagements`), the feature definitions and their
point-in-time counters (`shared.features`, `services.feature`), the trainer (`train_model`), the
ranker's candidate stage, post-ranking and A/B split, and the monitor's assessment, decision
rules and gate (`services.monitor`). What the twin replaces is only transport and storage: Redis,
the lake and the registry become Python objects, and wall-time settings (schedules, cooldowns)
are converted to simulated time with the clock's speed-up.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from services.feature.compute import snapshot_rows
from services.feature.datasets import DatasetWindow, build_examples, split_by_time
from services.monitor.assess import (
    CHAMPION_VARIANT,
    ChampionMemory,
    WindowOutcome,
    arm_samples,
    assess_window,
    join_served,
)
from services.monitor.gate import holdout_metrics, passes
from services.monitor.rules import (
    AbDecision,
    AbState,
    ArmSample,
    ChampionTrack,
    QualityBaseline,
    RequestSample,
    RollbackWatch,
    decide_ab,
)
from services.ranker.candidates import CandidateStage, Pools
from services.ranker.ranking import ab_bucket, diversify
from services.traffic.simulator import engagements
from services.trainer.data import to_split
from services.trainer.training import predict, train_model
from shared.clock import FixedClock
from shared.config import DataConfig, ModelConfig, MonitoringConfig, ServingConfig
from shared.features import FeatureSpec, raw_from_rows
from shared.schemas import CATALOG_SCHEMA, EVENT_SCHEMA, SERVED_SCHEMA, EventType
from shared.timeutil import HOUR_MS, MINUTE_MS, duration_ms, to_ms
from shared.world import World
from shared.world.runtime import with_overrides
from shared.world.simulator import SessionSimulator

log = structlog.get_logger(__name__)

CHALLENGER_VARIANT = "challenger"
TICK_MS = 5 * MINUTE_MS
"""Requests are served in ticks: candidate pools and engaged sets are rebuilt between ticks (the
live ranker rebuilds pools every second of wall time, a few simulated minutes)."""


@dataclass(frozen=True)
class Configs:
    data: DataConfig
    model: ModelConfig
    serving: ServingConfig
    monitoring: MonitoringConfig

    @property
    def speedup(self) -> float:
        return self.data.clock.speedup

    def sim_ms(self, wall: Any) -> int:
        """A wall-time setting (a timedelta) in simulated milliseconds."""
        return int(wall.total_seconds() * 1000 * self.speedup)


@dataclass
class Model:
    version: int
    network: Any  # a torch module (predictions match its parity-checked ONNX export)
    trained_until_ms: int

    def score(self, dense: np.ndarray, ids: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(predict(self.network, dense, ids), dtype=np.float64)


@dataclass
class Snapshot:
    as_of_ms: int
    users: dict[int, int]  # user id -> row
    user_rows: np.ndarray
    items: np.ndarray  # sorted item ids
    item_rows: np.ndarray


@dataclass
class RunRecord:
    """One monitoring run, as the report and the act step saw it."""

    at_ms: int
    status: str
    champion: int
    challenger: int | None
    champion_ratio: float | None  # champion's clicks per oracle-expected click in the window
    cusum: float | None
    alerts: list[str]  # severity alert: what the loop acts on
    actions: dict[str, Any]
    drift: list[str] = field(default_factory=list)  # drift records at level alert (alerts for people)


@dataclass
class Retrain:
    reason: str
    due_ms: int  # the data cut (after retrain.delay)
    ready_ms: int | None = None  # dataset + training + gate take this long (simulated)


@dataclass
class Twin:
    """The whole loop for one world (seed) and one set of configs."""

    configs: Configs
    seed: int
    drift: dict[str, Any] = field(default_factory=dict)
    retrain_seconds: float = 40.0  # wall seconds a retrain (dataset, training, gate) takes live
    acting: bool = True  # False: the monitor judges and alerts but never acts (false-alarm counts)

    def __post_init__(self) -> None:
        data = self.configs.data
        self.world = World.create(data)
        self.spec = FeatureSpec.from_config(data)
        self.rng = np.random.default_rng([self.seed, 2026])
        self.now_ms = to_ms(data.live_start)
        self.events: list[tuple[int, int, pa.Table]] = []  # (min ts, max ts, events)
        self.served: list[tuple[int, int, pa.Table]] = []
        self.models: dict[str, Model] = {}
        self.versions: dict[int, Model] = {}
        self.next_version = 1
        self.engaged: dict[int, set[int]] = {}  # the real-time consumer's engaged-item sets
        self.bucket_clicks: dict[int, np.ndarray] = {}  # popularity bucket -> clicks per item
        self._unapplied: list[pa.Table] = []  # engagements the real-time consumer has not seen yet
        self.snapshot: Snapshot | None = None
        # the ranker's candidate stage; its pools are filled here, so it needs no Redis and no clock
        self.candidates = CandidateStage(
            None,
            FixedClock(self.now_ms),
            data.world.n_topics,
            self.configs.serving.candidates,
            data.realtime,
        )
        self.memory: dict[int, ChampionMemory] = {}
        self.ab_state = AbState()
        self.challenger_since_ms: int | None = None
        self.pending: Retrain | None = None
        self.running: Retrain | None = None
        self.retrain_cooldown_until = -math.inf
        self.rollback_cooldown_until = -math.inf
        self.champion_history: list[int] = []
        self.runs: list[RunRecord] = []
        self.audit: list[dict[str, Any]] = []
        self.last_outcome: WindowOutcome | None = None
        self._requests = 0

    # ------------------------------------------------------------------ setup

    def bootstrap(self) -> None:
        """The history the baseline policy generated, and a champion trained on it (the etl and
        train pipelines of `make run`)."""
        data = self.configs.data
        chunks = [c.events for c in SessionSimulator(self.world).run(data.world.start, data.live_start)]
        self._add_events(pa.concat_tables(chunks))
        end = to_ms(data.live_start)
        model = self.train(end - duration_ms(data.dataset.span), end)
        self.promote(model)
        self.refresh_snapshot()

    def fork(self, seed: int) -> Twin:
        """An independent continuation from this state (its own random stream from now on)."""
        twin = copy.copy(self)
        twin.events, twin.served = list(self.events), list(self.served)
        twin.models, twin.versions = dict(self.models), dict(self.versions)
        twin.memory = dict(self.memory)
        twin.engaged = {user: set(items) for user, items in self.engaged.items()}
        twin.bucket_clicks = {b: counts.copy() for b, counts in self.bucket_clicks.items()}
        twin._unapplied = list(self._unapplied)
        twin.runs, twin.audit = list(self.runs), list(self.audit)
        twin.champion_history = list(self.champion_history)
        twin.drift = copy.deepcopy(self.drift)
        twin.candidates = copy.copy(self.candidates)
        twin.rng = np.random.default_rng([self.seed, seed, 7])
        return twin

    def inject(self, knob: str, **params: Any) -> None:
        """Start a drift knob now (as `python -m services.traffic inject-drift` does live)."""
        after = self.now_ms - to_ms(self.configs.data.world.start)
        self.drift[knob] = {**self.drift.get(knob, {}), **params, "starts_after": f"{after}ms"}
        self.world = World.create(with_overrides(self.configs.data, self.drift))

    # ------------------------------------------------------------------ storage

    def _add_events(self, table: pa.Table) -> None:
        if table.num_rows:
            ts = table["ts"].cast(pa.int64())
            self.events.append((int(pc.min(ts).as_py()), int(pc.max(ts).as_py()), table))
            engagements = table.filter(pc.is_in(table["event_type"], pa.array(["click", "like", "hide"])))
            if engagements.num_rows:
                self._unapplied.append(engagements)

    def _apply_realtime(self, until_ms: int) -> None:
        """What the real-time consumer has applied by `until_ms`: engagements whose time has come
        (the traffic simulator posts each one at its own timestamp) go into the engaged sets, and
        clicks into the popularity buckets."""
        if not self._unapplied:
            return
        table = pa.concat_tables(self._unapplied)
        ts = table["ts"].cast(pa.int64()).to_numpy()
        due = ts < until_ms
        later = table.filter(pa.array(~due))
        self._unapplied = [later] if later.num_rows else []
        table, ts = table.filter(pa.array(due)), ts[due]
        users, items = table["user_id"].to_numpy(), table["item_id"].to_numpy()
        for user, item in zip(users.tolist(), items.tolist(), strict=True):
            self.engaged.setdefault(user, set()).add(item)
        clicks = table["event_type"].to_numpy(zero_copy_only=False) == EventType.CLICK.value
        bucket_ms = duration_ms(self.configs.data.realtime.popularity_bucket)
        for bucket in np.unique(ts[clicks] // bucket_ms):
            in_bucket = clicks & (ts // bucket_ms == bucket)
            counts = self.bucket_clicks.setdefault(int(bucket), np.zeros(self.world.n_items))
            if counts.size < self.world.n_items:  # a new item cohort grew the world
                counts = self.bucket_clicks[int(bucket)] = np.pad(
                    counts, (0, self.world.n_items - counts.size)
                )
            np.add.at(counts, items[in_bucket], 1.0)

    def events_between(self, start_ms: int, end_ms: int) -> pa.Table:
        parts = [t for lo, hi, t in self.events if hi >= start_ms and lo < end_ms]
        if not parts:
            return EVENT_SCHEMA.empty_table()
        table = pa.concat_tables(parts)
        ts = table["ts"].cast(pa.int64())
        return table.filter(pc.and_(pc.greater_equal(ts, start_ms), pc.less(ts, end_ms)))

    def served_between(self, start_ms: int, end_ms: int) -> pa.Table:
        parts = [t for lo, hi, t in self.served if hi >= start_ms and lo < end_ms]
        if not parts:
            return SERVED_SCHEMA.empty_table()
        table = pa.concat_tables(parts)
        ts = table["ts"].cast(pa.int64())
        return table.filter(pc.and_(pc.greater_equal(ts, start_ms), pc.less(ts, end_ms)))

    def catalog(self, at_ms: int) -> pa.Table:
        ids = self.world.published_items(at_ms)
        return pa.table(
            {
                "item_id": ids,
                "creator_id": self.world.item_creator[ids],
                "topic_id": self.world.item_topic[ids],
                "published_at": pa.array(self.world.item_published_ms[ids], pa.int64()).cast(
                    CATALOG_SCHEMA.field("published_at").type
                ),
            }
        )

    def lookback_ms(self) -> int:
        return DatasetWindow.from_config(self.configs.data, 0, 0).lookback_ms

    # ------------------------------------------------------------------ feature store

    def refresh_snapshot(self) -> None:
        """Materialise the online store as of now (the scheduled etl's last step)."""
        as_of = self.now_ms
        events = self.events_between(as_of - self.lookback_ms(), as_of)
        users, user_rows, items, item_rows = snapshot_rows(self.spec, events, self.catalog(as_of), as_of)
        self.snapshot = Snapshot(as_of, {int(u): i for i, u in enumerate(users)}, user_rows, items, item_rows)

    def _pools(self, at_ms: int) -> Pools:
        """The candidate stage's pools from the real-time signals: clicks over the last popularity
        buckets (overall and per topic) and the freshest published items."""
        realtime, cfg = self.configs.data.realtime, self.configs.serving.candidates
        bucket_ms = duration_ms(realtime.popularity_bucket)
        newest = at_ms // bucket_ms
        counts = np.zeros(self.world.n_items)
        for bucket in range(newest - realtime.popularity_buckets + 1, newest + 1):
            found = self.bucket_clicks.get(bucket)
            if found is not None:
                counts[: found.size] += found

        def top(mask: np.ndarray | None, n: int) -> np.ndarray:
            scores = counts if mask is None else np.where(mask, counts, 0)
            order = np.argsort(-scores, kind="stable")[:n]
            return order[scores[order] > 0].astype(np.int64)

        trending = top(None, cfg.trending)
        published = self.world.item_published_ms
        visible = np.flatnonzero(published <= at_ms)
        fresh = visible[np.argsort(-published[visible], kind="stable")[: cfg.fresh]].astype(np.int64)
        by_topic = {t: top(self.world.item_topic == t, cfg.per_topic) for t in range(self.world.n_topics)}
        return Pools(trending, {int(i): float(counts[i]) for i in trending}, fresh, by_topic, at_ms)

    # ------------------------------------------------------------------ serving

    def serve(self, until_ms: int) -> None:
        """Users request feeds at the world's session rate until `until_ms`; the ranker answers;
        the world's ground truth decides what they click, like and hide."""
        while self.now_ms < until_ms:
            tick_end = min(self.now_ms + TICK_MS, until_ms)
            self._serve_tick(self.now_ms, tick_end)
            self.now_ms = tick_end

    def _serve_tick(self, start_ms: int, end_ms: int) -> None:
        world, serving = self.world, self.configs.serving
        users = world.active_users(start_ms)
        rate = world.user_activity[users] * world.diurnal_factor(start_ms) * (end_ms - start_ms) / 86_400_000
        sessions = self.rng.poisson(rate)
        req_users = np.repeat(users, sessions)
        if req_users.size == 0:
            return
        self.rng.shuffle(req_users)
        req_ts = np.sort(self.rng.integers(start_ms, end_ms, size=req_users.size))
        self._apply_realtime(start_ms)
        self.candidates.pools = self._pools(start_ms)
        engaged = self.engaged
        snapshot = self.snapshot
        assert snapshot is not None
        k = serving.traffic.k or self.configs.data.traffic.feed_size
        feeds: list[tuple[int, int, Model, np.ndarray, np.ndarray, np.ndarray]] = []
        dense_blocks, id_blocks = [], []
        for user, ts in zip(req_users.tolist(), req_ts.tolist(), strict=True):
            model = self._pick_model(user)
            row = snapshot.users.get(user)
            user_row = snapshot.user_rows[row] if row is not None else np.zeros(len(self.spec.user_fields))
            topic_at = self.spec.user_fields.index("user_topic_clicks_0")
            topic_clicks = user_row[topic_at : topic_at + self.spec.n_topics] if row is not None else None
            pool = self.candidates.for_user(topic_clicks)
            seen = engaged.get(user)
            if serving.post_ranking.drop_engaged and seen:
                pool = pool[~np.isin(pool, np.fromiter(seen, dtype=np.int64))]
            if pool.size == 0:
                continue
            item_rows, creators, topics = self._item_rows(pool, ts)
            raw = raw_from_rows(self.spec, user_row, item_rows, ts, np.zeros(pool.size))
            dense_blocks.append(np.ascontiguousarray(self.spec.dense_matrix(raw)))
            id_blocks.append((np.full(pool.size, user), pool, creators, topics))
            feeds.append((user, ts, model, pool, creators, np.zeros(0)))
        if not feeds:
            return
        scores_by_model: dict[int, np.ndarray] = {}
        offsets = np.cumsum([0, *(b.shape[0] for b in dense_blocks)])
        dense = np.concatenate(dense_blocks)
        ids = {
            "user_id": np.concatenate([b[0] for b in id_blocks]).astype(np.int64),
            "item_id": np.concatenate([b[1] for b in id_blocks]).astype(np.int64),
            "creator_id": np.concatenate([b[2] for b in id_blocks]).astype(np.int64),
            "topic_id": np.concatenate([b[3] for b in id_blocks]).astype(np.int64),
        }
        for model in {f[2].version: f[2] for f in feeds}.values():
            scores_by_model[model.version] = model.score(dense, ids)
        events: list[dict[str, Any]] = []
        served: dict[str, list[Any]] = {name: [] for name in SERVED_SCHEMA.names}
        for index, (user, ts, model, pool, creators, _) in enumerate(feeds):
            scores = scores_by_model[model.version][offsets[index] : offsets[index + 1]]
            order = np.argsort(-scores, kind="stable")
            chosen = diversify(pool, creators, order, k, serving.post_ranking.max_per_creator)
            items = pool[chosen].tolist()
            self._requests += 1
            request_id = f"t{self.seed}-{self._requests}"
            events += engagements(self.world, user, items, request_id, ts, self.rng)
            variant = next(alias for alias, m in self.models.items() if m is model)
            n = len(items)
            served["request_id"] += [request_id] * n
            served["user_id"] += [user] * n
            served["item_id"] += items
            served["position"] += list(range(n))
            served["score"] += scores[chosen].tolist()
            served["model_version"] += [model.version] * n
            served["variant"] += [variant] * n
            served["feature_version"] += [self.spec.version] * n
            served["degraded"] += [False] * n
            served["ts"] += [ts] * n
        self._add_events(pa.Table.from_pylist(events, schema=EVENT_SCHEMA))
        table = pa.table(
            {
                **{name: served[name] for name in SERVED_SCHEMA.names if name != "ts"},
                "ts": pa.array(served["ts"], pa.int64()).cast(SERVED_SCHEMA.field("ts").type),
            }
        ).cast(SERVED_SCHEMA)
        self.served.append((min(served["ts"]), max(served["ts"]), table))

    def _pick_model(self, user: int) -> Model:
        challenger = self.models.get(CHALLENGER_VARIANT)
        ab = self.configs.serving.ab
        if challenger is not None and ab_bucket(user, ab.salt) < ab.challenger_share:
            return challenger
        return self.models[CHAMPION_VARIANT]

    def _item_rows(self, pool: np.ndarray, now_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Snapshot rows of the candidates; items newer than the snapshot from the catalog (their
        counters zero), as the feature store's read does."""
        snapshot = self.snapshot
        assert snapshot is not None
        at = np.searchsorted(snapshot.items, pool)
        found = (at < snapshot.items.size) & (snapshot.items[np.minimum(at, snapshot.items.size - 1)] == pool)
        rows = np.zeros((pool.size, len(self.spec.item_fields)))
        rows[found] = snapshot.item_rows[at[found]]
        missing = ~found
        if missing.any():
            fields = self.spec.item_fields
            rows[missing, fields.index("creator_id")] = self.world.item_creator[pool[missing]]
            rows[missing, fields.index("topic_id")] = self.world.item_topic[pool[missing]]
            rows[missing, fields.index("published_at")] = self.world.item_published_ms[pool[missing]]
        creators = rows[:, self.spec.item_fields.index("creator_id")].astype(np.int64)
        topics = rows[:, self.spec.item_fields.index("topic_id")].astype(np.int64)
        return rows, creators, topics

    # ------------------------------------------------------------------ training and the registry

    def train(
        self, start_ms: int, end_ms: int, validation_ms: int | None = None, test_ms: int | None = None,
        half_life_ms: int | None = None,
    ) -> tuple[Model, pa.Table]:  # fmt: skip
        """A dataset of [start, end) and a model trained on it (the dataset and train pipelines).
        Returns the model and its test split (the gate's holdout)."""
        data = self.configs.data
        window = DatasetWindow.from_config(data, start_ms, end_ms)
        events = self.events_between(window.history_start_ms, end_ms)
        table, _ = build_examples(events, self.catalog(end_ms), self.spec, window)
        splits = split_by_time(table, window, data, validation_ms, test_ms)
        names = self.spec.dense_names
        result = train_model(
            self.configs.model, names, to_split(splits["train"], names), to_split(splits["validation"], names),
            recency_half_life_ms=half_life_ms,
        )  # fmt: skip
        model = Model(self.next_version, result.model, end_ms)
        self.versions[model.version] = model
        self.next_version += 1
        return model, splits["test"]

    def promote(self, model: Model | tuple[Model, pa.Table]) -> None:
        if isinstance(model, tuple):
            model = model[0]
        self.models[CHAMPION_VARIANT] = model
        self.models.pop(CHALLENGER_VARIANT, None)
        self.champion_history.append(model.version)

    @property
    def champion(self) -> Model:
        return self.models[CHAMPION_VARIANT]

    @property
    def challenger(self) -> Model | None:
        return self.models.get(CHALLENGER_VARIANT)

    # ------------------------------------------------------------------ the monitor

    def step(self) -> RunRecord:
        """One monitoring interval: serve it (refreshing snapshots on the etl schedule), then one
        monitoring run (assess + act), exactly as the monitor's pipeline does."""
        configs = self.configs
        interval = configs.sim_ms(configs.monitoring.schedule_every)
        etl_every = (
            configs.sim_ms(configs.data.pipeline.schedule_every)
            if configs.data.pipeline.schedule_every
            else None
        )
        target = self.now_ms + interval
        while self.now_ms < target:
            next_refresh = (
                self.snapshot.as_of_ms + etl_every if etl_every and self.snapshot is not None else target
            )
            stop = min(target, max(next_refresh, self.now_ms + 1))
            self.serve(stop)
            if etl_every and self.snapshot is not None and self.now_ms >= next_refresh:
                self.refresh_snapshot()
        self._advance_retrain()
        return self.monitor()

    def monitor(self) -> RunRecord:
        cfg = self.configs.monitoring
        end = self.now_ms // MINUTE_MS * MINUTE_MS
        start = end - duration_ms(cfg.windows.serving)
        label_delay = duration_ms(cfg.windows.label_delay)
        lookback = self.lookback_ms()
        window = DatasetWindow(start, end, lookback, label_delay)
        events = self.events_between(window.history_start_ms, end)
        examples, _ = build_examples(events, self.catalog(end), self.spec, window)
        joined = join_served(examples, self.served_between(start, end))
        version = self.champion.version
        memory = self.memory.get(version) or ChampionMemory(None, RequestSample.empty(), None)
        outcome = assess_window(
            f"run-{len(self.runs)}", start, end - label_delay, joined, self.world, self.spec.dense_names,
            version, memory, cfg,
        )  # fmt: skip
        self.memory[version] = outcome.memory
        self.last_outcome = outcome
        result = outcome.assessment
        firing = [a for a in result.alerts if a["severity"] == "alert"]
        actions = self.act(firing, outcome, end)
        look = result.quality_look or {}
        champion_ratio = next(
            (
                q.ctr_ratio
                for q in result.quality
                if q.variant == CHAMPION_VARIANT and q.model_version == version
            ),
            None,
        )
        record = RunRecord(
            end, result.status, version, self.challenger.version if self.challenger else None, champion_ratio,
            look.get("statistic"), [f"{a['kind']}:{a['what']}" for a in firing], actions,
            [f"{a['kind']}:{a['what']}" for a in result.alerts if a.get("level") == "alert"],
        )  # fmt: skip
        self.runs.append(record)
        return record

    def act(self, firing: list[dict[str, Any]], outcome: WindowOutcome, now: int) -> dict[str, Any]:
        """The act step: rollback, retrain scheduling, A/B decision (the same rules as jobs.act;
        the registry, Redis and the pipelines are this object)."""
        cfg = self.configs.monitoring
        actions: dict[str, Any] = {}
        if not self.acting:
            return actions
        if any(a["kind"] == "promotion_regression" for a in firing) and len(self.champion_history) > 1:
            before = self.champion.version
            previous = self.champion_history[-2]
            self.models[CHAMPION_VARIANT] = self.versions[previous]
            self.champion_history.pop()
            self.memory.pop(before, None)
            self.memory.pop(previous, None)
            self.rollback_cooldown_until = now + self.configs.sim_ms(cfg.rollback.cooldown)
            self.audit.append({"kind": "rolled_back", "at": now, "from": before, "to": previous})
            actions["rollback"] = {"from": before, "to": previous}
        triggers = [a for a in firing if a["kind"] in cfg.retrain.triggers]
        idle = self.challenger is None and self.pending is None and self.running is None
        if triggers and idle and now >= self.rollback_cooldown_until and now >= self.retrain_cooldown_until:
            self.retrain_cooldown_until = now + self.configs.sim_ms(cfg.retrain.cooldown)
            reason = "; ".join(f"{a['kind']}:{a['what']}" for a in triggers)
            self.pending = Retrain(reason, now + duration_ms(cfg.retrain.delay))
            self.audit.append({"kind": "retrain_scheduled", "at": now, "reason": reason})
            actions["retrain"] = "scheduled"
        if self.challenger is not None:
            decision = self._decide_ab(now, outcome)
            actions["ab"] = decision.decision
        return actions

    def _advance_retrain(self) -> None:
        """A pending retrain starts at its data cut and is gated `retrain_seconds` of wall time
        later (the dataset, training and gate pipelines running live)."""
        cfg = self.configs.monitoring
        if self.pending is not None and self.now_ms >= self.pending.due_ms and self.running is None:
            self.running = replace(
                self.pending, ready_ms=self.now_ms + int(self.retrain_seconds * 1000 * self.configs.speedup)
            )
            self.pending = None
            self.audit.append({"kind": "retrain_triggered", "at": self.now_ms})
        if (
            self.running is not None
            and self.running.ready_ms is not None
            and self.now_ms >= self.running.ready_ms
        ):
            cut = self.running.due_ms
            candidate, holdout = self.train(
                cut - duration_ms(cfg.retrain.window), cut, duration_ms(cfg.retrain.validation),
                duration_ms(cfg.retrain.test),
                duration_ms(cfg.retrain.recency_half_life) if cfg.retrain.recency_half_life else None,
            )  # fmt: skip
            names, k = list(self.spec.dense_names), self.configs.model.evaluation.ndcg_k
            mine = holdout_metrics(candidate.score, holdout, names, k)
            theirs = holdout_metrics(self.champion.score, holdout, names, k)
            passed = passes(mine, theirs, cfg.retrain.gate)
            self.audit.append({"kind": "gate_passed" if passed else "gate_failed", "at": self.now_ms,
                               "candidate": mine, "champion": theirs, "version": candidate.version})  # fmt: skip
            if passed:
                self.models[CHALLENGER_VARIANT] = candidate
                self.challenger_since_ms = self.now_ms
                self.ab_state = AbState()
            self.running = None

    def _decide_ab(self, now: int, outcome: WindowOutcome) -> AbDecision:
        cfg = self.configs.monitoring
        challenger, champion = self.challenger, self.champion
        assert challenger is not None
        assert self.challenger_since_ms is not None
        since = self.challenger_since_ms
        until = now - duration_ms(cfg.windows.label_delay)
        served = self.served_between(since, until)
        events = self.events_between(since, until + duration_ms(self.configs.data.features.label_window))
        arms = arm_samples(served, events.select(["event_type", "request_id", "position"]))
        control = arms.get((CHAMPION_VARIANT, champion.version), ArmSample.empty())
        treatment = arms.get((CHALLENGER_VARIANT, challenger.version), ArmSample.empty())
        self.ab_state, decision = decide_ab(self.ab_state, control, treatment, max(0, until - since), cfg.ab)
        if decision.decision == "promote":
            requests = outcome.requests.get((CHAMPION_VARIANT, champion.version))
            reference = (
                QualityBaseline.from_requests(requests, int(requests.ts.min()), int(requests.ts.max()) + 1)
                if requests is not None and len(requests)
                else None
            )
            self.promote(challenger)
            watch = (
                RollbackWatch(champion.version, reference, now, now + duration_ms(cfg.rollback.probation))
                if reference is not None
                else None
            )
            self.memory[challenger.version] = ChampionMemory(
                ChampionTrack(challenger.version, now, rollback=watch), RequestSample.empty(), None
            )
            self.audit.append(
                {"kind": "promoted", "at": now, "version": challenger.version, **decision.figures}
            )
        elif decision.decision == "reject":
            self.models.pop(CHALLENGER_VARIANT, None)
            self.audit.append(
                {"kind": "challenger_rejected", "at": now, "why": decision.why, **decision.figures}
            )
        return decision

    # ------------------------------------------------------------------ helpers for experiments

    def run(self, runs: int, on_run: Callable[[Twin, RunRecord], bool] | None = None) -> list[RunRecord]:
        """`runs` monitoring intervals; `on_run` may stop early by returning True."""
        done = []
        for _ in range(runs):
            record = self.step()
            done.append(record)
            if on_run is not None and on_run(self, record):
                break
        return done

    def hours(self, ms: int) -> float:
        return ms / HOUR_MS
