"""Shared fixtures. Tests that need Redis get their own server, never the machine's shared one:

1. FEEDRANK_TEST_REDIS_URL, if set: a Redis you dedicate to tests (databases 1 and 2 are
   flushed between tests; the run refuses to start if they hold data it did not write);
2. otherwise a throwaway container through testcontainers, when Docker answers;
3. otherwise a private `redis-server` on a free port, when the binary is on PATH;
4. otherwise the tests fail with this explanation (no silent skip).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis

from shared.config import DataConfig, load_data_config
from shared.settings import REPO_CONFIG_DIR, Settings, get_settings
from tests.support import NoRedisError, private_redis

QUEUE_DB, STORE_DB = 1, 2
_MARKER = "feedrank:test-instance"


def _claim_explicit(url: str) -> None:
    for db in (QUEUE_DB, STORE_DB):
        conn = Redis.from_url(url, db=db)
        if conn.dbsize() and not conn.exists(_MARKER):
            pytest.fail(
                f"FEEDRANK_TEST_REDIS_URL={url}: database {db} holds data that is not from feedrank's tests. "
                "Point it at a Redis dedicated to tests.",
                pytrace=False,
            )


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    """redis://host:port of a Redis owned by this test session (see the module docstring)."""
    try:
        with private_redis() as url:
            if os.environ.get("FEEDRANK_TEST_REDIS_URL"):
                _claim_explicit(url)
            yield url
    except NoRedisError as exc:
        pytest.fail(str(exc), pytrace=False)


@dataclass(frozen=True)
class RedisPair:
    queue_url: str
    store_url: str
    queue: Redis
    store: Redis


@pytest.fixture
def redis_pair(redis_base_url: str) -> Iterator[RedisPair]:
    """Clean queue and feature-store databases for one test."""
    queue_url, store_url = f"{redis_base_url}/{QUEUE_DB}", f"{redis_base_url}/{STORE_DB}"
    queue, store = Redis.from_url(queue_url), Redis.from_url(store_url)
    for conn in (queue, store):
        conn.flushdb()
        conn.set(_MARKER, "1")
    yield RedisPair(queue_url, store_url, queue, store)
    for conn in (queue, store):
        conn.flushdb()
        conn.set(_MARKER, "1")
        conn.close()


@pytest.fixture(scope="session")
def tiny_config() -> DataConfig:
    return load_data_config(REPO_CONFIG_DIR, "tiny")


@pytest.fixture
def service_env(
    tmp_path: Path, redis_pair: RedisPair, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Environment of a service under test (tiny profile, private lake); also applied to this process."""
    env = {
        "FEEDRANK_QUEUE_URL": redis_pair.queue_url,
        "FEEDRANK_FEATURE_STORE_URL": redis_pair.store_url,
        "FEEDRANK_LAKE_PATH": str(tmp_path / "lake"),
        "FEEDRANK_PROFILE": "tiny",
        "FEEDRANK_LOG_FORMAT": "console",
        "FEEDRANK_LOG_LEVEL": "WARNING",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "FEEDRANK_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow/mlflow.db",
    }
    for key, value in env.items():
        if key != "PROMETHEUS_MULTIPROC_DIR":
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


@pytest.fixture
def settings(service_env: dict[str, str]) -> Settings:
    return get_settings()
