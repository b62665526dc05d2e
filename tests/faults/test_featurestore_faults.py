"""The feature store loses data (eviction under maxmemory, a restart): the ranker answers with the
`no_features` fallback, never with zero features reported as healthy; and what ingest keeps in
the store for new items (catalog hash, fresh pool) stays bounded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from services.ingest.ingestion import Ingestor
from services.ranker.app import create_app
from shared import keys
from shared.clock import FixedClock
from shared.config import DataConfig
from shared.features import FeatureSpec
from shared.featurestore import FeatureStore
from shared.lake import Lake
from shared.schemas import CATALOG_SCHEMA
from shared.timeutil import DAY_MS, to_ms
from tests.conftest import RedisPair
from tests.faults.harness import copy_redis
from tests.support import TrainedWorld

SPARE_DB = 10


def small_snapshot(store: FeatureStore, spec: FeatureSpec, users: int = 3, items: int = 4) -> str:
    snapshot = store.publish(
        spec, 1_767_400_000_000, np.arange(users), np.ones((users, len(spec.user_fields))),
        np.arange(items), np.ones((items, len(spec.item_fields))),
    )  # fmt: skip
    return snapshot.snapshot_id


def store_of(config: DataConfig, pair: RedisPair) -> tuple[FeatureSpec, FeatureStore]:
    online = config.online_store
    return FeatureSpec.from_config(config), FeatureStore(pair.store, online.ttl, online.superseded_ttl)


def test_a_live_pointer_without_its_rows_is_no_snapshot(
    tiny_config: DataConfig, redis_pair: RedisPair
) -> None:
    spec, store = store_of(tiny_config, redis_pair)
    sid = small_snapshot(store, spec)
    healthy = store.fetch(spec, 1, [1, 2])
    assert healthy.snapshot_id == sid
    assert healthy.user_found
    assert healthy.item_found.all()

    redis_pair.store.delete(keys.features_items(spec.version, sid))  # evicted under maxmemory
    assert store.fetch(spec, 1, [1, 2]).snapshot_id is None
    small_snapshot(store, spec)  # the same snapshot written again (the next materialize)
    assert store.fetch(spec, 1, [1, 2]).snapshot_id == sid
    redis_pair.store.delete(keys.features_users(spec.version, sid))
    assert store.fetch(spec, 1, [1, 2]).snapshot_id is None

    small_snapshot(store, spec)
    redis_pair.store.flushdb()  # a restarted store: the pointer is gone too
    assert store.fetch(spec, 1, [1, 2]).snapshot_id is None


def test_a_snapshot_without_users_is_not_mistaken_for_an_evicted_one(
    tiny_config: DataConfig, redis_pair: RedisPair
) -> None:
    spec, store = store_of(tiny_config, redis_pair)
    sid = small_snapshot(store, spec, users=0)
    fetched = store.fetch(spec, 1, [1, 2])
    assert fetched.snapshot_id == sid
    assert not fetched.user_found
    assert fetched.item_found.all()


@pytest.fixture
def spare_store(faults_world: TrainedWorld, redis_base_url: str) -> Iterator[Redis]:
    """A copy of the trained world's feature store that the test may damage."""
    spare = Redis.from_url(f"{redis_base_url}/{SPARE_DB}")
    spare.flushdb()
    copy_redis(faults_world.store, spare)
    yield spare
    spare.flushdb()


def test_the_ranker_answers_no_features_when_the_snapshot_is_evicted(
    faults_world: TrainedWorld, spare_store: Redis, redis_base_url: str
) -> None:
    settings = faults_world.settings.model_copy(update={"feature_store_url": f"{redis_base_url}/{SPARE_DB}"})
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").json().get("status") != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert not client.post("/rank", json={"user_id": 3, "k": 5}).json()["degraded"]
        (pointer,) = spare_store.keys(f"{keys.PREFIX}:fs:*:current")
        fv = pointer.decode().split(":")[2]
        sid = spare_store.get(pointer).decode()
        users = spare_store.dump(keys.features_users(fv, sid))
        spare_store.delete(keys.features_users(fv, sid))  # evicted; the pointer lives on

        ranked = client.post("/rank", json={"user_id": 3, "k": 5}).json()
        given = client.post("/rank", json={"user_id": 3, "candidates": [1, 2, 3], "k": 3}).json()
        predicted = client.post("/predict", json={"user_id": 3, "item_ids": [1, 2]}).json()
        assert (ranked["degraded"], ranked["reason"], ranked["variant"]) == (True, "no_features", "fallback")
        assert len(ranked["items"]) == 5  # the popularity fallback still fills the feed
        assert (given["degraded"], given["reason"]) == (True, "no_features")
        assert (predicted["degraded"], predicted["reason"]) == (True, "no_features")

        spare_store.restore(keys.features_users(fv, sid), 0, users)  # the next materialize
        assert not client.post("/rank", json={"user_id": 3, "k": 5}).json()["degraded"]
        spare_store.flushdb()  # a restart of the store
        assert (
            client.post("/rank", json={"user_id": 3, "candidates": [1, 2], "k": 2}).json()["reason"]
            == "no_features"
        )


def test_catalog_and_fresh_pool_stay_bounded(
    tiny_config: DataConfig, redis_pair: RedisPair, tmp_path: Path
) -> None:
    online = tiny_config.online_store.model_copy(update={"catalog_max_items": 50})
    config = tiny_config.model_copy(update={"online_store": online})
    now = to_ms(config.live_start)
    ingestor = Ingestor(
        lake=Lake(tmp_path / "lake"), queue_redis=redis_pair.queue, store_redis=redis_pair.store,
        config=config, clock=FixedClock(now),
    )  # fmt: skip
    max_age_ms = int(online.catalog_max_age.total_seconds() * 1000)
    for batch in range(4):
        ids = np.arange(batch * 40, batch * 40 + 40)
        published = np.where(ids % 4 == 0, now - max_age_ms - DAY_MS, now - ids * 1000)  # a quarter too old
        table = pa.table(
            {"item_id": ids, "creator_id": ids % 7, "topic_id": ids % 3, "published_at": published},
            schema=CATALOG_SCHEMA,
        )
        ingestor.items_from_table(table, f"items-{batch}", source="test")
    fresh = {int(i) for i in redis_pair.store.zrange(keys.FRESH_ITEMS, 0, -1)}
    catalog = {int(i) for i in redis_pair.store.hkeys(keys.CATALOG)}
    assert fresh == catalog
    young = [i for i in range(160) if i % 4]  # the rest is older than catalog_max_age
    assert fresh == set(young[:50])  # capped at catalog_max_items, the most recently published kept
