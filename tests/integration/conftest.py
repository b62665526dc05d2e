"""Fixtures for integration tests that need a trained, registered model (built once per module)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis

from shared.dags import submit_etl_then_train
from shared.pipeline import PipelineRunner
from shared.settings import Settings, get_settings
from tests.support import run_worker

WORLD_QUEUE_DB, WORLD_STORE_DB = 3, 4


@dataclass(frozen=True)
class TrainedWorld:
    """A tiny world after etl and train: lake, online store, MLflow store with a champion."""

    env: dict[str, str]
    settings: Settings
    queue: Redis
    store: Redis
    root: Path


@pytest.fixture(scope="module")
def trained_world(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainedWorld]:
    root = tmp_path_factory.mktemp("trained-world")
    env = {
        "FEEDRANK_QUEUE_URL": f"{redis_base_url}/{WORLD_QUEUE_DB}",
        "FEEDRANK_FEATURE_STORE_URL": f"{redis_base_url}/{WORLD_STORE_DB}",
        "FEEDRANK_LAKE_PATH": str(root / "lake"),
        "FEEDRANK_PROFILE": "tiny",
        "FEEDRANK_LOG_FORMAT": "console",
        "FEEDRANK_LOG_LEVEL": "WARNING",
        "FEEDRANK_MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow/mlflow.db",
        "FEEDRANK_MODEL_CACHE_DIR": str(root / "model-cache"),
        "FEEDRANK_ADMIN_TOKEN": "test-admin-token",
        "PROMETHEUS_MULTIPROC_DIR": str(root / "metrics"),
    }
    queue, store = (
        Redis.from_url(env["FEEDRANK_QUEUE_URL"]),
        Redis.from_url(env["FEEDRANK_FEATURE_STORE_URL"]),
    )
    for conn in (queue, store):
        conn.flushdb()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            if key != "PROMETHEUS_MULTIPROC_DIR":
                patch.setenv(key, value)
        get_settings.cache_clear()
        settings = get_settings()
        data, model = settings.data_config(), settings.ranking_model_config()
        chain = submit_etl_then_train(queue, data, model, "simulate")
        assert chain is not None
        result = run_worker(env, ["ingest", "features", "training"])
        assert result.returncode == 0, result.stderr[-3000:]
        view = PipelineRunner(queue, model.pipeline).run(chain[1])
        assert view is not None
        assert view.status == "finished", [(s.name, s.status, s.error) for s in view.steps]
        yield TrainedWorld(env, settings, queue, store, root)
        get_settings.cache_clear()
    for conn in (queue, store):
        conn.flushdb()
