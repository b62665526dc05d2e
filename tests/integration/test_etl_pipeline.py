"""The etl pipeline end to end: real Redis, real RQ worker processes, a real lake on disk."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.feature.compute import Counters, event_log
from shared.connections import feature_store, lake
from shared.dags import etl_params, etl_pipeline
from shared.features import FeatureSpec
from shared.pipeline import PipelineRunner, RunView
from shared.settings import Settings
from shared.timeutil import to_ms
from tests.conftest import RedisPair
from tests.support import run_worker

pytestmark = pytest.mark.integration


def run_etl(
    settings: Settings,
    service_env: dict[str, str],
    redis_pair: RedisPair,
    source: str = "simulate",
    **kw: object,
) -> RunView:
    config = settings.data_config()
    runner = PipelineRunner(redis_pair.queue, config.pipeline)
    run_id = runner.submit(etl_pipeline(config), etl_params(config, source, **kw))  # type: ignore[arg-type]
    assert run_id is not None
    result = run_worker(service_env, [config.queues.ingest, config.queues.features])
    assert result.returncode == 0, result.stderr[-3000:]
    view = runner.run(run_id)
    assert view is not None
    return view


def test_etl_builds_datasets_and_the_online_store(
    settings: Settings, service_env: dict[str, str], redis_pair: RedisPair
) -> None:
    view = run_etl(settings, service_env, redis_pair)
    assert view.status == "finished", [(s.name, s.status, s.error) for s in view.steps]
    assert [s.name for s in view.steps] == ["generate", "validate", "features", "split", "materialize"]
    assert [s.status for s in view.steps] == ["finished"] * 5
    generated = view.steps[0].result
    assert generated is not None
    assert generated["received"] == generated["stored"] > 1000
    assert generated["quarantined"] == generated["duplicates"] == 0

    config = settings.data_config()
    spec = FeatureSpec.from_config(config)
    the_lake = lake(settings)
    dataset_id = (the_lake.features_dir / spec.version / "LATEST").read_text()
    directory = the_lake.features_dir / spec.version / dataset_id
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["feature_version"] == spec.version
    assert manifest["dense"] == list(spec.dense_names)
    splits = manifest["splits"]
    assert sum(part["rows"] for part in splits.values()) == manifest["rows"] > 0
    assert (
        splits["train"]["end"]
        < splits["validation"]["start"]
        <= splits["validation"]["end"]
        < splits["test"]["start"]
    )
    assert 0 < manifest["label_rate"] < 0.5
    for name, part in splits.items():
        assert pq.read_table(directory / f"{name}.parquet").num_rows == part["rows"]
    assert the_lake.read_quarantine("events").num_rows == 0

    # The online store holds exactly what the shared counters say as of the window's end.
    store = feature_store(settings)
    snapshot = store.current(spec.version)
    assert snapshot is not None
    assert snapshot.as_of_ms == to_ms(config.live_start)
    as_of = snapshot.as_of_ms
    events = the_lake.read_events(as_of - 7 * 86_400_000, as_of)
    catalog = the_lake.read_catalog()
    counters = Counters(spec, event_log(events, catalog))
    user = int(events["user_id"][0].as_py())
    latest = np.argsort(events["ts"].cast(pa.int64()).to_numpy())[-3:]  # seen within every window
    items = events["item_id"].to_numpy()[latest]
    fetched = store.fetch(spec, user, items.tolist())
    # the same sums (of position weights) in another order: equal up to rounding
    np.testing.assert_allclose(fetched.user, counters.user_rows(np.array([user]), as_of)[0], rtol=1e-12)
    assert fetched.item_found.all()
    assert (
        fetched.items[:, spec.item_fields.index(spec.counter("item", "exposure", spec.windows_ms[-1]))].min()
        > 0
    )


def test_rerunning_a_window_changes_nothing(
    settings: Settings, service_env: dict[str, str], redis_pair: RedisPair
) -> None:
    first = run_etl(settings, service_env, redis_pair)
    events_before = lake(settings).read_events(0, 4_102_444_800_000).num_rows
    second = run_etl(settings, service_env, redis_pair)
    assert second.status == "finished"
    # The same deterministic batches again (a rerun acts like a retry): recognised as stored already,
    # counted as duplicates, nothing written twice.
    assert first.steps[0].result["stored"] == events_before  # type: ignore[index]
    assert second.steps[0].result["stored"] == 0  # type: ignore[index]
    assert second.steps[0].result["duplicates"] == events_before  # type: ignore[index]
    assert lake(settings).read_events(0, 4_102_444_800_000).num_rows == events_before
    assert second.steps[3].result == {**first.steps[3].result, "seconds": second.steps[3].result["seconds"]}  # type: ignore[index,dict-item]


def test_an_empty_window_fails_at_validation(
    settings: Settings, service_env: dict[str, str], redis_pair: RedisPair
) -> None:
    config = settings.data_config()
    view = run_etl(settings, service_env, redis_pair, source="lake", end=config.live_start)
    assert view.status == "failed"
    assert [s.status for s in view.steps] == ["finished", "failed", "canceled", "canceled", "canceled"]
    assert "fewer than dataset.min_rows" in (view.steps[1].error or "")


def test_a_bad_feature_set_fails_loudly_and_is_not_published(
    settings: Settings, service_env: dict[str, str], redis_pair: RedisPair
) -> None:
    run_etl(settings, service_env, redis_pair)
    the_lake = lake(settings)
    shutil.rmtree(the_lake.catalog_dir)  # every impression now names an unknown item
    spec = FeatureSpec.from_config(settings.data_config())
    latest_before = (the_lake.features_dir / spec.version / "LATEST").read_text()
    end = settings.data_config().live_start - timedelta(hours=6)
    view = run_etl(settings, service_env, redis_pair, source="lake", end=end)
    assert view.status == "failed"
    assert view.steps[2].status == "failed"
    assert "missing from the catalog" in (view.steps[2].error or "")
    assert (the_lake.features_dir / spec.version / "LATEST").read_text() == latest_before
