"""The online store: one round trip per request, never two snapshots mixed, never moving backwards."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import numpy as np
import pytest
from redis.connection import AbstractConnection

from shared import keys
from shared.config import DataConfig
from shared.features import FeatureSpec
from shared.featurestore import FeatureStore, pack_catalog, snapshot_id_for
from tests.conftest import RedisPair

pytestmark = pytest.mark.integration


@pytest.fixture
def spec(tiny_config: DataConfig) -> FeatureSpec:
    return FeatureSpec.from_config(tiny_config)


@pytest.fixture
def store(redis_pair: RedisPair) -> FeatureStore:
    return FeatureStore(redis_pair.store, timedelta(hours=1), timedelta(minutes=5), write_chunk=7)


def publish(store: FeatureStore, spec: FeatureSpec, as_of: int, scale: float = 1.0) -> None:
    users = np.arange(20)
    items = np.arange(100, 150)
    user_rows = np.arange(users.size * len(spec.user_fields), dtype=float).reshape(users.size, -1) * scale
    item_rows = np.arange(items.size * len(spec.item_fields), dtype=float).reshape(items.size, -1) * scale
    store.publish(spec, as_of, users, user_rows, items, item_rows)


def round_trips(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]) -> int:
    """How many times the client writes to the socket while `action` runs: one per round trip
    (a pipeline sends all its commands in one write)."""
    writes = 0
    real = AbstractConnection.send_packed_command

    def counting(self: AbstractConnection, command: object, check_health: bool = True) -> None:
        nonlocal writes
        writes += 1
        real(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    action()
    monkeypatch.undo()
    return writes


def test_rows_round_trip_exactly(store: FeatureStore, spec: FeatureSpec) -> None:
    publish(store, spec, 1000)
    fetched = store.fetch(spec, 3, [101, 149])
    width = len(spec.item_fields)
    np.testing.assert_array_equal(fetched.items[0], np.arange(width * 1, width * 2))
    np.testing.assert_array_equal(
        fetched.user, np.arange(3 * len(spec.user_fields), 4 * len(spec.user_fields))
    )
    assert fetched.user_found
    assert fetched.item_found.tolist() == [True, True]
    assert fetched.snapshot_id == snapshot_id_for(1000)


def test_one_request_is_one_round_trip(
    store: FeatureStore, spec: FeatureSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(store, spec, 1000)
    store.fetch(spec, 3, [101])  # learns the snapshot id once
    assert (
        round_trips(monkeypatch, lambda: store.fetch(spec, 3, list(range(100, 150)), with_engaged=True)) == 1
    )
    # items newer than the snapshot cost one more, to the catalog
    assert round_trips(monkeypatch, lambda: store.fetch(spec, 3, [100, 9999])) == 2


def test_unknown_user_and_items_are_zero_rows(store: FeatureStore, spec: FeatureSpec) -> None:
    publish(store, spec, 1000)
    fetched = store.fetch(spec, 999, [100, 5000])
    assert not fetched.user_found
    assert not fetched.user.any()
    assert fetched.item_found.tolist() == [True, False]
    assert not fetched.items[1].any()
    assert fetched.item_known.tolist() == [True, False]


def test_items_newer_than_the_snapshot_come_from_the_catalog(
    store: FeatureStore, spec: FeatureSpec, redis_pair: RedisPair
) -> None:
    publish(store, spec, 1000)
    redis_pair.store.hset(keys.CATALOG, 7000, pack_catalog(12, 3, 999_000))
    fetched = store.fetch(spec, 1, [7000, 100])
    assert fetched.item_found.tolist() == [False, True]
    assert fetched.item_known.tolist() == [True, True]
    assert fetched.items[0, :3].tolist() == [12, 3, 999_000]
    assert not fetched.items[0, 3:].any()


def test_no_snapshot_means_nothing_found(store: FeatureStore, spec: FeatureSpec) -> None:
    fetched = store.fetch(spec, 1, [100])
    assert fetched.snapshot_id is None
    assert not fetched.item_known.any()


def test_a_reader_follows_the_pointer_and_never_mixes_snapshots(
    store: FeatureStore, spec: FeatureSpec
) -> None:
    publish(store, spec, 1000, scale=1.0)
    first = store.fetch(spec, 1, [101, 102])
    publish(store, spec, 2000, scale=2.0)
    during = store.fetch(spec, 1, [101, 102])  # learned of the move on this read
    after = store.fetch(spec, 1, [101, 102])
    assert first.snapshot_id == during.snapshot_id == snapshot_id_for(1000)
    np.testing.assert_array_equal(during.items, first.items)  # every row from the old snapshot
    assert after.snapshot_id == snapshot_id_for(2000)
    np.testing.assert_array_equal(after.items, 2 * first.items)  # every row from the new one


def test_pointer_never_moves_backwards(store: FeatureStore, spec: FeatureSpec) -> None:
    publish(store, spec, 2000, scale=2.0)
    publish(store, spec, 1000, scale=1.0)  # a late rerun of an older window
    current = store.current(spec.version)
    assert current is not None
    assert current.as_of_ms == 2000
    assert store.fetch(spec, 1, [101]).items[0, 1] == 2.0 * (len(spec.item_fields) + 1)


def test_superseded_snapshot_expires_soon(
    store: FeatureStore, spec: FeatureSpec, redis_pair: RedisPair
) -> None:
    publish(store, spec, 1000)
    publish(store, spec, 2000)
    old = keys.features_items(spec.version, snapshot_id_for(1000))
    new = keys.features_items(spec.version, snapshot_id_for(2000))
    assert 0 < redis_pair.store.ttl(old) <= 300
    assert 300 < redis_pair.store.ttl(new) <= 3600


def test_feature_versions_are_isolated(
    store: FeatureStore, spec: FeatureSpec, tiny_config: DataConfig
) -> None:
    from shared.config import load_config
    from shared.settings import REPO_CONFIG_DIR

    other = FeatureSpec.from_config(
        load_config(DataConfig, REPO_CONFIG_DIR / "data.yaml", "tiny", {"features": {"prior_ctr": 0.2}})
    )
    publish(store, spec, 1000)
    assert store.fetch(other, 1, [100]).snapshot_id is None


def test_wrong_row_width_is_refused(store: FeatureStore, spec: FeatureSpec) -> None:
    with pytest.raises(ValueError, match="user rows"):
        store.publish(
            spec, 1, np.arange(2), np.zeros((2, 3)), np.arange(1), np.zeros((1, len(spec.item_fields)))
        )
