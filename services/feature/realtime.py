"""Near-real-time signals from the event stream: what each user already engaged with, and what is
trending overall and per topic, in time buckets. The ranker's candidate stage and post-ranking
rules read them; the model's features come from snapshots, so the two never disagree mid-request.

The consumer reads through a consumer group: an entry is acknowledged only after its effects are
written, so a crash replays it (the writes are sets and per-bucket counters; a replay can count a
chunk's clicks twice in one trending bucket, which only nudges a popularity pool).
"""

from __future__ import annotations

import socket

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from redis import Redis
from redis.exceptions import ResponseError

from shared import keys
from shared.config import RealtimeConfig
from shared.eventstream import decode_arrow
from shared.featurestore import CATALOG_FIELDS
from shared.schemas import EventType
from shared.timeutil import duration_ms

log = structlog.get_logger(__name__)

ENGAGEMENTS = (EventType.CLICK.value, EventType.LIKE.value, EventType.HIDE.value)


class RealtimeConsumer:
    def __init__(self, conn: Redis, config: RealtimeConfig, consumer: str | None = None) -> None:
        self.conn = conn
        self.config = config
        self.consumer = consumer or socket.gethostname()
        self._bucket_ms = duration_ms(config.popularity_bucket)
        try:
            conn.xgroup_create(keys.EVENT_STREAM, config.consumer_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def consume_once(self, block_ms: int | None = None) -> int:
        """Process one read (own pending entries first, then new ones); returns events applied."""
        applied = 0
        for start in ("0", ">"):
            response = self.conn.xreadgroup(
                self.config.consumer_group,
                self.consumer,
                {keys.EVENT_STREAM: start},
                count=self.config.read_count,
                block=block_ms if start == ">" else None,
            )
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    if fields:
                        applied += self._apply(fields[b"arrow"])
                    self.conn.xack(keys.EVENT_STREAM, self.config.consumer_group, entry_id)
        return applied

    def _apply(self, payload: bytes) -> int:
        table = decode_arrow(payload)
        engaged = table.filter(pc.is_in(table["event_type"], value_set=pa.array(ENGAGEMENTS)))
        if engaged.num_rows == 0:
            return 0
        users = engaged["user_id"].to_numpy()
        items = engaged["item_id"].to_numpy()
        is_click = engaged["event_type"].to_numpy(zero_copy_only=False) == EventType.CLICK.value
        buckets = engaged["ts"].cast("int64").to_numpy() // self._bucket_ms * self._bucket_ms
        topics = self._topics(np.unique(items[is_click]))
        engaged_ttl = int(self.config.engaged_ttl.total_seconds())
        bucket_ttl = int(self.config.bucket_ttl.total_seconds())
        with self.conn.pipeline(transaction=False) as pipe:
            for user in np.unique(users):
                pipe.sadd(keys.engaged_items(int(user)), *map(int, items[users == user]))
                pipe.expire(keys.engaged_items(int(user)), engaged_ttl)
            for bucket, item in zip(buckets[is_click], items[is_click], strict=True):
                pipe.zincrby(keys.popular_bucket(int(bucket)), 1, int(item))
                pipe.expire(keys.popular_bucket(int(bucket)), bucket_ttl)
                topic = topics.get(int(item))
                if topic is not None:
                    key = keys.topic_popular_bucket(topic, int(bucket))
                    pipe.zincrby(key, 1, int(item))
                    pipe.expire(key, bucket_ttl)
            pipe.execute()
        return int(engaged.num_rows)

    def _topics(self, items: np.ndarray) -> dict[int, int]:
        if items.size == 0:
            return {}
        rows = self.conn.hmget(keys.CATALOG, [int(i) for i in items])
        topic_at = CATALOG_FIELDS.index("topic_id")
        return {
            int(item): int(np.frombuffer(row, dtype=np.float64)[topic_at])
            for item, row in zip(items, rows, strict=True)
            if row
        }

    def run_forever(self) -> None:
        block_ms = duration_ms(self.config.block)
        log.info("realtime_consumer_started", consumer=self.consumer, group=self.config.consumer_group)
        while True:
            applied = self.consume_once(block_ms)
            if applied:
                log.debug("realtime_applied", events=applied)
