"""What every benchmark shares: a private Redis, a temporary lake and MLflow store, the bench profile."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from shared.config import DataConfig, ModelConfig, load_data_config, load_model_config
from shared.settings import REPO_CONFIG_DIR
from tests.support import private_redis

PROFILE = os.environ.get("FEEDRANK_BENCH_PROFILE", "bench")
"""Override only to try the benchmarks quickly on the tiny world; reported figures use `bench`."""


@dataclass(frozen=True)
class BenchContext:
    env: dict[str, str]
    root: Path
    queue: Redis
    data: DataConfig
    model: ModelConfig

    def store_conn(self) -> Redis:
        return Redis.from_url(self.env["FEEDRANK_FEATURE_STORE_URL"])


@contextmanager
def bench_context() -> Iterator[BenchContext]:
    with (
        private_redis(prefer_binary=True) as base,
        tempfile.TemporaryDirectory(prefix="feedrank-bench-") as tmp,
    ):
        root = Path(tmp)
        env = {
            "FEEDRANK_QUEUE_URL": f"{base}/1",
            "FEEDRANK_FEATURE_STORE_URL": f"{base}/2",
            "FEEDRANK_LAKE_PATH": str(root / "lake"),
            "FEEDRANK_PROFILE": PROFILE,
            "FEEDRANK_LOG_LEVEL": "WARNING",
            "FEEDRANK_LOG_FORMAT": "console",
            "FEEDRANK_MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow/mlflow.db",
            "PROMETHEUS_MULTIPROC_DIR": str(root / "metrics"),
        }
        queue = Redis.from_url(env["FEEDRANK_QUEUE_URL"])
        for conn in (queue, Redis.from_url(env["FEEDRANK_FEATURE_STORE_URL"])):
            conn.flushdb()
        os.environ.update(env)
        yield BenchContext(
            env,
            root,
            queue,
            load_data_config(REPO_CONFIG_DIR, PROFILE),
            load_model_config(REPO_CONFIG_DIR, PROFILE),
        )
