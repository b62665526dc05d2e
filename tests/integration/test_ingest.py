"""ingest's guarantees: counts reconcile, bad records are kept with reasons, duplicates never stored
twice, retries are idempotent, valid events reach the lake and the stream."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from services.ingest.ingestion import Ingestor
from shared import keys
from shared.clock import FixedClock
from shared.config import DataConfig
from shared.eventstream import decode_arrow
from shared.featurestore import CATALOG_FIELDS
from shared.lake import Lake
from shared.timeutil import HOUR_MS, to_ms
from tests.conftest import RedisPair

pytestmark = pytest.mark.integration
FOREVER_MS = 4_102_444_800_000  # 2100-01-01


@pytest.fixture
def ingestor(tiny_config: DataConfig, redis_pair: RedisPair, tmp_path: Any) -> Ingestor:
    return Ingestor(
        lake=Lake(tmp_path / "lake"),
        queue_redis=redis_pair.queue,
        store_redis=redis_pair.store,
        config=tiny_config,
        clock=FixedClock(to_ms(tiny_config.live_start)),
    )


def event(i: int, hour: int = 10, **changes: Any) -> dict[str, Any]:
    base = {
        "event_id": f"r{i}-0-i", "event_type": "impression", "user_id": i % 7, "item_id": i % 11,
        "request_id": f"r{i}", "position": 0, "ts": 1767225600000 + hour * HOUR_MS + i,
    }  # fmt: skip
    return base | changes


def lake_ids(ingestor: Ingestor) -> list[str]:
    return sorted(ingestor.lake.read_events(0, FOREVER_MS)["event_id"].to_pylist())


def test_mixed_batch_reconciles_and_keeps_the_bad(ingestor: Ingestor) -> None:
    batch = [event(i) for i in range(8)] + [event(100, user_id=-1), {"nonsense": True}, event(0)]
    report = ingestor.events_from_records(batch, "b1", source="test")
    assert (report.received, report.stored, report.quarantined, report.duplicates) == (11, 8, 2, 1)
    assert report.reconciles
    assert lake_ids(ingestor) == sorted(e["event_id"] for e in batch[:8])
    quarantine = ingestor.lake.read_quarantine("events").to_pylist()
    assert quarantine[0]["reasons"] == "user_id_range"
    assert json.loads(quarantine[0]["raw"])["user_id"] == -1
    assert "unknown_fields" in quarantine[1]["reasons"]
    assert json.loads(quarantine[1]["raw"]) == {"nonsense": True}


def test_duplicates_across_batches_are_counted_not_stored(ingestor: Ingestor) -> None:
    ingestor.events_from_records([event(i) for i in range(5)], "b1", source="test")
    report = ingestor.events_from_records([event(i) for i in range(3, 8)], "b2", source="test")
    assert (report.stored, report.duplicates) == (3, 2)
    assert len(lake_ids(ingestor)) == 8


def test_retrying_a_batch_is_idempotent(ingestor: Ingestor) -> None:
    batch = [event(i, hour=10 + i % 3) for i in range(9)]
    first = ingestor.events_from_records(batch, "same-batch", source="test")
    again = ingestor.events_from_records(batch, "same-batch", source="test")
    assert (first.stored, first.duplicates) == (9, 0)
    assert (again.stored, again.duplicates) == (0, 9)  # a replay of a stored batch: counted once
    assert len(lake_ids(ingestor)) == 9  # nothing doubled


def test_valid_events_reach_the_stream(ingestor: Ingestor, redis_pair: RedisPair) -> None:
    ingestor.events_from_records([event(i) for i in range(5)] + [event(9, position=-1)], "b1", source="test")
    entries = redis_pair.store.xrange(keys.EVENT_STREAM)
    streamed = pa.concat_tables([decode_arrow(fields[b"arrow"]) for _, fields in entries])
    assert sorted(streamed["event_id"].to_pylist()) == sorted(f"r{i}-0-i" for i in range(5))


def test_totals_and_reports_are_kept(ingestor: Ingestor, redis_pair: RedisPair) -> None:
    ingestor.events_from_records([event(1), event(1), event(2, event_type="share")], "b1", source="test")
    totals = {k.decode(): int(v) for k, v in redis_pair.queue.hgetall(keys.INGEST_TOTALS).items()}
    assert totals == {
        "events:received": 3,
        "events:stored": 1,
        "events:quarantined": 1,
        "events:duplicates": 1,
    }
    ((_, fields),) = redis_pair.queue.xrange(keys.INGEST_REPORTS)
    assert json.loads(fields[b"report"])["rule_failures"] == {"event_type_known": 1}


def test_arrow_batches_take_the_same_path(ingestor: Ingestor, tiny_config: DataConfig) -> None:
    from shared.world import SessionSimulator, World

    world = World.create(tiny_config)
    chunk = next(iter(SessionSimulator(world).run(tiny_config.world.start, tiny_config.live_start)))
    report = ingestor.events_from_table(chunk.events, "sim-1", source="test")
    assert report.stored == chunk.events.num_rows > 0
    assert report.quarantined == report.duplicates == 0


def test_catalog_items_become_servable(ingestor: Ingestor, redis_pair: RedisPair) -> None:
    items = [{"item_id": 5, "creator_id": 2, "topic_id": 1, "published_at": "2026-01-02T00:00:00Z"},
             {"item_id": 6, "creator_id": 2, "topic_id": -4, "published_at": "2026-01-02T00:00:00Z"}]  # fmt: skip
    report = ingestor.items_from_records(items, "c1", source="test")
    assert (report.stored, report.quarantined) == (1, 1)
    row = np.frombuffer(redis_pair.store.hget(keys.CATALOG, 5), dtype=np.float64)
    assert dict(zip(CATALOG_FIELDS, row.tolist(), strict=True)) == {
        "creator_id": 2, "topic_id": 1, "published_at": 1767312000000,
    }  # fmt: skip
    assert redis_pair.store.zscore(keys.FRESH_ITEMS, 5) == 1767312000000
    assert ingestor.lake.read_catalog()["item_id"].to_pylist() == [5]
