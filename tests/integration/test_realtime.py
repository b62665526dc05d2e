"""Near-real-time signals from the event stream: engaged items and trending pools."""

from __future__ import annotations

from typing import Any

import pytest

from services.feature.realtime import RealtimeConsumer
from services.ingest.ingestion import Ingestor
from shared import keys
from shared.clock import FixedClock
from shared.config import DataConfig
from shared.lake import Lake
from shared.timeutil import HOUR_MS, to_ms
from tests.conftest import RedisPair

pytestmark = pytest.mark.integration

T = 1767268800000  # 2026-01-01T12:00:00Z


def event(kind: str, user: int, item: int, slot: str, ts: int) -> dict[str, Any]:
    return {
        "event_id": f"{slot}-{kind}", "event_type": kind, "user_id": user, "item_id": item, "request_id": slot,
        "position": 0, "ts": ts, **({"dwell_ms": 10} if kind == "click" else {}),
    }  # fmt: skip


@pytest.fixture
def ingestor(tiny_config: DataConfig, redis_pair: RedisPair, tmp_path: Any) -> Ingestor:
    ingestor = Ingestor(
        lake=Lake(tmp_path), queue_redis=redis_pair.queue, store_redis=redis_pair.store,
        config=tiny_config, clock=FixedClock(to_ms(tiny_config.live_start)),
    )  # fmt: skip
    ingestor.items_from_records(
        [{"item_id": i, "creator_id": 1, "topic_id": i % 3, "published_at": T - HOUR_MS} for i in (10, 11, 12)],
        "catalog", source="test",
    )  # fmt: skip
    return ingestor


def test_engagements_become_signals(
    ingestor: Ingestor, tiny_config: DataConfig, redis_pair: RedisPair
) -> None:
    ingestor.events_from_records(
        [
            event("impression", 1, 10, "a", T), event("click", 1, 10, "a", T + 1000),
            event("hide", 1, 11, "b", T + 2000), event("click", 2, 10, "c", T + 3000),
            event("click", 2, 12, "d", T + HOUR_MS),
        ],
        "b1", source="test",
    )  # fmt: skip
    consumer = RealtimeConsumer(redis_pair.store, tiny_config.realtime, consumer="t1")
    assert consumer.consume_once(block_ms=None) == 4
    assert redis_pair.store.smembers(keys.engaged_items(1)) == {b"10", b"11"}
    assert redis_pair.store.smembers(keys.engaged_items(2)) == {b"10", b"12"}
    hour = T // HOUR_MS * HOUR_MS
    assert redis_pair.store.zscore(keys.popular_bucket(hour), 10) == 2
    assert redis_pair.store.zscore(keys.topic_popular_bucket(10 % 3, hour), 10) == 2
    assert redis_pair.store.zscore(keys.popular_bucket(hour + HOUR_MS), 12) == 1
    assert consumer.consume_once(block_ms=None) == 0  # acknowledged: nothing is applied twice


def test_a_crash_before_ack_replays_the_entry(
    ingestor: Ingestor, tiny_config: DataConfig, redis_pair: RedisPair
) -> None:
    ingestor.events_from_records([event("click", 5, 10, "x", T)], "b1", source="test")
    group = tiny_config.realtime.consumer_group
    consumer = RealtimeConsumer(redis_pair.store, tiny_config.realtime, consumer="t1")
    redis_pair.store.xreadgroup(group, "t1", {keys.EVENT_STREAM: ">"}, count=10)  # read, then "crash"
    assert consumer.consume_once(block_ms=None) == 1  # the pending entry is applied on restart
    assert redis_pair.store.smembers(keys.engaged_items(5)) == {b"10"}
