"""The etl pipeline end to end: real Redis, real RQ worker processes, a real lake on disk."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from services.feature.pipelines import etl_params, etl_pipeline
from shared.connections import feature_store, lake
from shared.features import FeatureSpec
from shared.pipeline import PipelineRunner
from shared.settings import Settings
from tests.conftest import RedisPair
from tests.support import run_worker

pytestmark = pytest.mark.integration


def test_etl_runs_through_real_workers(
    settings: Settings, service_env: dict[str, str], redis_pair: RedisPair
) -> None:
    config = settings.data_config()
    runner = PipelineRunner(redis_pair.queue, config.pipeline)
    run_id = runner.submit(etl_pipeline(config), etl_params(config, "simulate"))
    assert run_id is not None

    result = run_worker(service_env, [config.queues.ingest, config.queues.features])
    assert result.returncode == 0, result.stderr[-3000:]

    view = runner.run(run_id)
    assert view is not None
    assert view.status == "finished", [(s.name, s.status, s.error) for s in view.steps]
    assert [s.status for s in view.steps] == ["finished"] * 5

    spec = FeatureSpec.from_config(config)
    the_lake = lake(settings)
    dataset_id = (the_lake.features_dir / spec.version / "LATEST").read_text()
    manifest = json.loads((the_lake.features_dir / spec.version / dataset_id / "manifest.json").read_text())
    assert manifest["feature_version"] == spec.version
    assert set(manifest["splits"]) == {"train", "validation", "test"}
    rows = sum(part["rows"] for part in manifest["splits"].values())
    assert rows == manifest["rows"] > 0
    test = pq.read_table(the_lake.features_dir / spec.version / dataset_id / "test.parquet")
    assert test.num_rows == manifest["splits"]["test"]["rows"]

    snapshot = feature_store(settings).current(spec.version)
    assert snapshot is not None and snapshot.users > 0 and snapshot.items > 0
    fetched = feature_store(settings).fetch(spec, 0, [0, 1, 2])
    assert fetched.items.shape == (3, len(spec.item_fields))
    assert np.isfinite(fetched.items).all()
