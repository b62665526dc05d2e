"""Connections built from Settings, so every service talks to the same places the same way.

Every Redis client carries socket and connect timeouts (config `redis`): a stalled or unreachable
Redis fails a call with a TimeoutError after a few seconds instead of freezing the caller. RQ
workers raise the socket timeout above their own blocking dequeue by themselves.
"""

from __future__ import annotations

from redis import Redis

from shared.config import RedisClientConfig
from shared.featurestore import FeatureStore
from shared.lake import Lake
from shared.settings import Settings


def redis_client(url: str, config: RedisClientConfig, socket_timeout_s: float | None = None) -> Redis:
    """A client that never waits forever: `socket_timeout_s` overrides the configured reply timeout
    (the ranker's feature reads wait milliseconds, not seconds)."""
    timeout = socket_timeout_s if socket_timeout_s is not None else config.socket_timeout.total_seconds()
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, config.connect_timeout.total_seconds()),
        health_check_interval=int(config.health_check_interval.total_seconds()),
    )


def queue_redis(settings: Settings, socket_timeout_s: float | None = None) -> Redis:
    return redis_client(str(settings.queue_url), settings.data_config().redis, socket_timeout_s)


def store_redis(settings: Settings, socket_timeout_s: float | None = None) -> Redis:
    return redis_client(str(settings.feature_store_url), settings.data_config().redis, socket_timeout_s)


def lake(settings: Settings) -> Lake:
    return Lake(settings.lake_path)


def feature_store(settings: Settings, conn: Redis | None = None) -> FeatureStore:
    cfg = settings.data_config().online_store
    return FeatureStore(conn or store_redis(settings), cfg.ttl, cfg.superseded_ttl, cfg.write_chunk)
