"""The candidate stage: a few hundred items worth scoring when a request names none.

Pools (trending overall, trending per topic, freshest) are rebuilt from the real-time signals in
a background thread and kept in memory, so picking candidates costs no Redis call. The trending
pool doubles as the fallback ranking when Redis is unavailable.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from redis import Redis

from shared import keys
from shared.clock import Clock
from shared.config import CandidatesConfig, RealtimeConfig
from shared.timeutil import duration_ms

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Pools:
    trending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    trending_scores: dict[int, float] = field(default_factory=dict)
    fresh: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    by_topic: dict[int, np.ndarray] = field(default_factory=dict)
    built_at_ms: int = 0


def _ids(members: list[bytes]) -> np.ndarray:
    return np.array([int(m) for m in members], dtype=np.int64)


class CandidateStage:
    def __init__(
        self, conn: Redis, clock: Clock, n_topics: int, config: CandidatesConfig, realtime: RealtimeConfig
    ) -> None:
        self.conn = conn
        self.clock = clock
        self.n_topics = n_topics
        self.config = config
        self.realtime = realtime
        self.pools = Pools()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _bucket_keys(self, now_ms: int, key_for: object) -> list[str]:
        size = duration_ms(self.realtime.popularity_bucket)
        newest = now_ms // size * size
        return [key_for(newest - i * size) for i in range(self.realtime.popularity_buckets)]  # type: ignore[operator]

    def refresh(self) -> Pools:
        """Rebuild every pool in one round trip; Redis merges the buckets and returns only the top."""
        now = self.clock.now_ms()
        cfg = self.config
        with self.conn.pipeline(transaction=False) as pipe:
            self._top(pipe, self._bucket_keys(now, keys.popular_bucket), cfg.trending)
            pipe.zrevrangebyscore(keys.FRESH_ITEMS, now, "-inf", start=0, num=cfg.fresh)
            for topic in range(self.n_topics):
                self._top(
                    pipe,
                    self._bucket_keys(now, lambda b, t=topic: keys.topic_popular_bucket(t, b)),
                    cfg.per_topic,
                )
            replies = pipe.execute()
        trending = replies[1]  # reply of ZRANGE in the first (ZUNIONSTORE, ZRANGE, DEL) triple
        fresh = replies[3]
        topics = [replies[4 + 3 * t + 1] for t in range(self.n_topics)]
        pools = Pools(
            trending=_ids([member for member, _ in trending]),
            trending_scores={int(m): float(s) for m, s in trending},
            fresh=_ids(fresh),
            by_topic={topic: _ids([m for m, _ in raw]) for topic, raw in enumerate(topics)},
            built_at_ms=now,
        )
        self.pools = pools
        return pools

    def _top(self, pipe: Any, bucket_keys: list[str], n: int) -> None:
        scratch = keys.candidate_scratch(uuid.uuid4().hex)
        pipe.zunionstore(scratch, bucket_keys)
        pipe.zrange(scratch, 0, n - 1, desc=True, withscores=True)
        pipe.delete(scratch)

    def for_user(self, topic_clicks: np.ndarray | None) -> np.ndarray:
        """Trending, fresh, and trending within the user's favourite topics; unique, capped."""
        pools = self.pools
        parts = [pools.trending, pools.fresh]
        if topic_clicks is not None and topic_clicks.size and topic_clicks.max() > 0:
            favourite = np.argsort(-topic_clicks, kind="stable")[: self.config.favourite_topics]
            parts += [
                pools.by_topic.get(int(t), np.zeros(0, np.int64)) for t in favourite if topic_clicks[t] > 0
            ]
        merged = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        _, first = np.unique(merged, return_index=True)
        return merged[np.sort(first)][: self.config.max]

    def fallback(self, candidates: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Popularity order from memory, of the given candidates or the trending pool: (items, scores)."""
        pools = self.pools
        items = candidates if candidates is not None else np.concatenate([pools.trending, pools.fresh])
        _, first = np.unique(items, return_index=True)
        items = items[np.sort(first)]
        popularity = np.array([pools.trending_scores.get(int(i), 0.0) for i in items])
        order = np.argsort(-popularity, kind="stable")[:k]
        total = max(float(popularity.sum()), 1.0)
        return items[order], popularity[order] / total

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception as exc:
                    log.warning("candidate_pools_stale", error=str(exc))
                self._stop.wait(self.config.refresh.total_seconds())

        self._thread = threading.Thread(target=loop, name="candidate-pools", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
