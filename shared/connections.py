"""Connections built from Settings, so every service talks to the same places the same way."""

from __future__ import annotations

from redis import Redis

from shared.featurestore import FeatureStore
from shared.lake import Lake
from shared.settings import Settings


def queue_redis(settings: Settings) -> Redis:
    return Redis.from_url(str(settings.queue_url))


def store_redis(settings: Settings) -> Redis:
    return Redis.from_url(str(settings.feature_store_url))


def lake(settings: Settings) -> Lake:
    return Lake(settings.lake_path)


def feature_store(settings: Settings, conn: Redis | None = None) -> FeatureStore:
    cfg = settings.data_config().online_store
    return FeatureStore(conn or store_redis(settings), cfg.ttl, cfg.superseded_ttl, cfg.write_chunk)
