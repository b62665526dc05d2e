"""The online store's refresh schedule: RQ's cron scheduler enqueues a trigger at the configured
interval, and the trigger never starts a second run while one is active."""

from __future__ import annotations

import pytest
from rq import Queue

from services.feature.schedule import build_scheduler, scheduled_refresh
from shared.config import DataConfig, load_config
from shared.pipeline import PipelineRunner
from shared.settings import REPO_CONFIG_DIR, Settings
from tests.conftest import RedisPair

pytestmark = pytest.mark.integration


def test_scheduler_uses_the_configured_interval(redis_pair: RedisPair) -> None:
    config = load_config(DataConfig, REPO_CONFIG_DIR / "data.yaml", "default")
    cron = build_scheduler(redis_pair.queue, config)
    (job,) = cron.get_jobs()
    assert job.interval == config.pipeline.schedule_every.total_seconds()  # type: ignore[union-attr]
    assert job.queue_name == config.queues.features
    cron.enqueue_jobs()
    queued = Queue(config.queues.features, connection=redis_pair.queue).jobs
    assert [j.func_name for j in queued] == ["services.feature.schedule.scheduled_refresh"]


def test_no_schedule_when_disabled(redis_pair: RedisPair) -> None:
    config = load_config(
        DataConfig, REPO_CONFIG_DIR / "data.yaml", "tiny", overrides={"pipeline": {"schedule_every": None}}
    )
    assert config.pipeline.schedule_every is None
    with pytest.raises(ValueError, match="nothing to schedule"):
        build_scheduler(redis_pair.queue, config)


def test_trigger_never_starts_two_runs(settings: Settings, redis_pair: RedisPair) -> None:
    first = scheduled_refresh()
    assert first is not None
    assert scheduled_refresh() is None
    runner = PipelineRunner(redis_pair.queue, settings.data_config().pipeline)
    assert runner.active_run("refresh") == first
    assert [v.run_id for v in runner.runs("refresh")] == [first]
    assert [s.name for s in runner.runs("refresh")[0].steps] == ["materialize"]
