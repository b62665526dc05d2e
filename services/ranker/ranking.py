"""Ranking a feed: candidates -> features (one Redis round trip) -> ONNX scores -> post-ranking rules.

Framework-free so it can be tested and benchmarked without HTTP. When Redis fails or is slow, a
circuit breaker sends requests to the in-memory popularity fallback for a cool-down period, then
tries Redis again: the ranker recovers by itself, and a dead Redis costs one timeout, not one per
request.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import structlog
from redis.exceptions import RedisError

from services.ranker.candidates import CandidateStage
from services.ranker.impressions import ImpressionLog, ServedFeed
from services.ranker.models import ModelManager, ServedModel
from shared.clock import Clock
from shared.config import ServingConfig
from shared.features import FeatureSpec, raw_from_rows
from shared.featurestore import FeatureStore, Fetched
from shared.timeutil import duration_ms

log = structlog.get_logger(__name__)

CHAMPION, CHALLENGER, FALLBACK = "champion", "challenger", "fallback"


@dataclass
class RankedFeed:
    request_id: str
    user_id: int
    variant: str
    model_version: int | None
    feature_version: str
    degraded: bool
    items: np.ndarray
    scores: np.ndarray
    candidates: int
    reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Prediction:
    variant: str
    model_version: int | None
    feature_version: str
    scores: np.ndarray
    degraded: bool
    reason: str | None = None


def ab_bucket(user_id: int, salt: str) -> float:
    """A stable number in [0, 1) per user: the same user always lands in the same variant."""
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def diversify(
    items: np.ndarray, creators: np.ndarray, order: np.ndarray, k: int, max_per_creator: int
) -> np.ndarray:
    """Indices of the top k in `order`, at most `max_per_creator` per creator; if that leaves fewer
    than k, the best of the held-back items fill the rest (a short feed is worse than a repeat)."""
    chosen: list[int] = []
    held: list[int] = []
    per_creator: dict[int, int] = {}
    for index in order:
        creator = int(creators[index])
        if creator >= 0 and per_creator.get(creator, 0) >= max_per_creator:
            held.append(int(index))
            continue
        per_creator[creator] = per_creator.get(creator, 0) + 1
        chosen.append(int(index))
        if len(chosen) == k:
            break
    if len(chosen) < k:
        chosen += held[: k - len(chosen)]
    return np.array(chosen, dtype=np.int64)


class Ranker:
    def __init__(
        self,
        store: FeatureStore,
        spec: FeatureSpec,
        models: ModelManager,
        candidates: CandidateStage,
        impressions: ImpressionLog,
        clock: Clock,
        config: ServingConfig,
    ) -> None:
        self.store = store
        self.spec = spec
        self.models = models
        self.candidates = candidates
        self.impressions = impressions
        self.clock = clock
        self.config = config
        self._redis_down_until = 0.0
        self._redis_failures = 0
        self._topic_clicks_at = spec.user_fields.index("user_topic_clicks_0")
        self._creator_col = spec.item_fields.index("creator_id")
        self._topic_col = spec.item_fields.index("topic_id")
        self._published_col = spec.item_fields.index("published_at")

    # ------------------------------------------------------------------ helpers

    def pick_model(self, user_id: int) -> ServedModel | None:
        models = self.models.models
        challenger = models.get(CHALLENGER)
        if (
            challenger is not None
            and ab_bucket(user_id, self.config.ab.salt) < self.config.ab.challenger_share
        ):
            return challenger
        return models.get(CHAMPION) or challenger

    @property
    def redis_available(self) -> bool:
        return time.monotonic() >= self._redis_down_until

    def _fetch(self, user_id: int, items: list[int], with_engaged: bool) -> Fetched:
        """A feature read through the circuit breaker: after `breaker_failures` failures in a row,
        requests skip Redis for `breaker_cooldown`; the first success closes it again."""
        try:
            fetched = self.store.fetch(self.spec, user_id, items, with_engaged=with_engaged)
        except (RedisError, OSError) as exc:
            self._redis_failures += 1
            degradation = self.config.degradation
            if self._redis_failures >= degradation.breaker_failures:
                self._redis_down_until = time.monotonic() + degradation.breaker_cooldown.total_seconds()
            log.warning("feature_store_unavailable", error=repr(exc), failures=self._redis_failures)
            raise
        self._redis_failures = 0
        return fetched

    def features(
        self, fetched: Fetched, user_id: int, items: np.ndarray, now_ms: int, positions: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Dense matrix and id columns for the model, from fetched rows (vectorized)."""
        rows = fetched.items.copy()
        unknown = ~fetched.item_known
        if unknown.any():
            rows[unknown, self._published_col] = now_ms - duration_ms(self.config.models.cold_item_age)
        raw = raw_from_rows(self.spec, fetched.user, rows, now_ms, positions)
        dense = np.ascontiguousarray(self.spec.dense_matrix(raw))
        n = rows.shape[0]
        ids = {
            "user_id": np.full(n, user_id, dtype=np.int64),
            "item_id": np.asarray(items, dtype=np.int64),
            "creator_id": np.where(fetched.item_known, rows[:, self._creator_col], -1).astype(np.int64),
            "topic_id": np.where(fetched.item_known, rows[:, self._topic_col], -1).astype(np.int64),
        }
        return dense, ids

    # ------------------------------------------------------------------ endpoints

    def rank(self, user_id: int, candidates: list[int] | None, k: int) -> RankedFeed:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        request_id = uuid.uuid4().hex
        now = self.clock.now_ms()
        model = self.pick_model(user_id)
        given = np.array(list(dict.fromkeys(candidates)), dtype=np.int64) if candidates is not None else None
        reason: str | None = None
        if model is None:
            reason = "no_model"
        elif not self.redis_available:
            reason = "redis_unavailable"
        if reason is None:
            assert model is not None
            try:
                feed = self._rank_with_model(model, user_id, given, k, now, timings)
            except (RedisError, OSError):
                reason = "redis_unavailable"
            else:
                if feed is not None:
                    feed.request_id = request_id
                    feed.timings = {**timings, "total": time.perf_counter() - started}
                    self._log(feed, now)
                    return feed
                reason = "no_features"
        items, scores = self.candidates.fallback(given, k)
        feed = RankedFeed(
            request_id, user_id, FALLBACK, None, self.spec.version, True, items, scores,
            candidates=int(given.size if given is not None else items.size), reason=reason,
        )  # fmt: skip
        feed.timings = {"total": time.perf_counter() - started}
        self._log(feed, now)
        return feed

    def _rank_with_model(
        self,
        model: ServedModel,
        user_id: int,
        given: np.ndarray | None,
        k: int,
        now: int,
        timings: dict[str, float],
    ) -> RankedFeed | None:
        t = time.perf_counter()
        if given is None:
            head = self._fetch(user_id, [], with_engaged=True)
            topic_clicks = head.user[self._topic_clicks_at : self._topic_clicks_at + self.spec.n_topics]
            pool = self.candidates.for_user(topic_clicks if head.user_found else None)
            engaged = head.engaged
        else:
            pool, engaged = given, frozenset()
        if self.config.post_ranking.drop_engaged and engaged:
            pool = pool[~np.isin(pool, np.fromiter(engaged, dtype=np.int64, count=len(engaged)))]
        timings["candidates"] = time.perf_counter() - t
        t = time.perf_counter()
        fetched = self._fetch(user_id, pool.tolist(), with_engaged=given is not None)
        if fetched.snapshot_id is None:
            return None
        if given is not None and self.config.post_ranking.drop_engaged and fetched.engaged:
            keep = ~np.isin(pool, np.fromiter(fetched.engaged, dtype=np.int64, count=len(fetched.engaged)))
            pool, fetched = pool[keep], _subset(fetched, keep)
        dense, ids = self.features(fetched, user_id, pool, now, np.zeros(pool.size))
        timings["features"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = model.score(dense, ids) if pool.size else np.zeros(0, dtype=np.float32)
        timings["inference"] = time.perf_counter() - t
        t = time.perf_counter()
        order = np.argsort(-scores, kind="stable")
        chosen = diversify(pool, ids["creator_id"], order, k, self.config.post_ranking.max_per_creator)
        timings["post_ranking"] = time.perf_counter() - t
        return RankedFeed(
            "", user_id, model.variant, model.version, model.feature_version, False,
            pool[chosen], scores[chosen], candidates=int(pool.size),
        )  # fmt: skip

    def predict(self, user_id: int, item_ids: list[int], positions: list[int] | None) -> Prediction:
        """Click probabilities in the given order (at the given positions; default the top slot)."""
        model = self.pick_model(user_id)
        if model is None:
            return Prediction(FALLBACK, None, self.spec.version, np.zeros(len(item_ids)), True, "no_model")
        if not self.redis_available:
            return Prediction(
                FALLBACK, None, self.spec.version, np.zeros(len(item_ids)), True, "redis_unavailable"
            )
        try:
            fetched = self._fetch(user_id, item_ids, with_engaged=False)
        except (RedisError, OSError):
            return Prediction(
                FALLBACK, None, self.spec.version, np.zeros(len(item_ids)), True, "redis_unavailable"
            )
        slots = np.asarray(positions if positions is not None else np.zeros(len(item_ids)), dtype=np.float64)
        dense, ids = self.features(
            fetched, user_id, np.asarray(item_ids, dtype=np.int64), self.clock.now_ms(), slots
        )
        scores = model.score(dense, ids)
        missing = fetched.snapshot_id is None
        return Prediction(
            model.variant, model.version, model.feature_version, scores, missing,
            "no_features" if missing else None,
        )  # fmt: skip

    def _log(self, feed: RankedFeed, now: int) -> None:
        self.impressions.record(
            ServedFeed(
                request_id=feed.request_id,
                user_id=feed.user_id,
                items=[int(i) for i in feed.items],
                positions=list(range(len(feed.items))),
                scores=[round(float(s), 6) for s in feed.scores],
                model_version=feed.model_version,
                variant=feed.variant,
                feature_version=feed.feature_version,
                ts=now,
                degraded=feed.degraded,
            )
        )


def _subset(fetched: Fetched, keep: np.ndarray) -> Fetched:
    return Fetched(
        fetched.snapshot_id, fetched.user, fetched.user_found, fetched.items[keep],
        fetched.item_found[keep], fetched.item_known[keep], fetched.engaged,
    )  # fmt: skip
