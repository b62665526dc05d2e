"""The retraining DAG trains on the recent window it was asked for, not on whatever dataset an
unrelated etl run happens to write (an etl run's span and splits are the bootstrap's)."""

from __future__ import annotations

import pytest

from shared.dags import submit_etl, submit_retrain
from shared.lake import dataset_id
from shared.pipeline import PipelineRunner
from shared.settings import Settings
from shared.timeutil import duration_ms
from tests.conftest import RedisPair

pytestmark = pytest.mark.integration


def test_a_retrain_builds_and_trains_on_its_own_recent_window_while_an_etl_runs(
    settings: Settings, redis_pair: RedisPair
) -> None:
    data, model, monitoring = (
        settings.data_config(),
        settings.ranking_model_config(),
        settings.monitoring_config(),
    )
    etl = submit_etl(redis_pair.queue, data, "lake")
    assert etl is not None  # holds the etl pipeline's lock

    runs = submit_retrain(redis_pair.queue, data, model, monitoring, "quality:test")

    assert runs is not None, "an etl run blocked the retrain"
    dataset_run = PipelineRunner(redis_pair.queue, data.pipeline).run(runs["dataset"])
    train_run = PipelineRunner(redis_pair.queue, model.pipeline).run(runs["train"])
    assert dataset_run is not None
    assert train_run is not None
    assert [s.name for s in dataset_run.steps] == ["validate", "features", "split"]
    window = dataset_run.params
    assert window["end_ms"] - window["start_ms"] == duration_ms(monitoring.retrain.window)
    assert window["test_ms"] == duration_ms(monitoring.retrain.test)
    assert train_run.params["dataset_id"] == dataset_id(window["start_ms"], window["end_ms"])
    assert train_run.params["alias"] == "candidate"
    assert submit_retrain(redis_pair.queue, data, model, monitoring, "again") is None  # one at a time
