"""Pipeline definitions of the data plane (the seed's ETL DAG) and their schedule."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from redis import Redis
from rq import get_current_job
from rq.cron import CronScheduler

from shared.clock import AcceleratedClock, Clock
from shared.config import DataConfig
from shared.pipeline import Pipeline, PipelineRunner, Step
from shared.settings import get_settings
from shared.timeutil import MINUTE_MS, duration_ms, to_ms

Source = Literal["simulate", "lake"]


def etl_pipeline(config: DataConfig) -> Pipeline:
    """generate -> validate -> features -> split -> materialize."""
    q = config.queues
    return Pipeline(
        "etl",
        (
            Step("generate", "services.ingest.jobs.generate", q.ingest),
            Step("validate", "services.feature.jobs.validate_window", q.features),
            Step("features", "services.feature.jobs.build_features", q.features),
            Step("split", "services.feature.jobs.split_dataset", q.features),
            Step("materialize", "services.feature.jobs.materialize", q.features),
        ),
    )


def etl_params(
    config: DataConfig, source: Source, end: datetime | None = None, clock: Clock | None = None
) -> dict[str, Any]:
    """The window of a run: `dataset.span` ending at `end`.

    Defaults: for a simulated backfill, the end of the backfilled history (live_start); for the
    lake, the world clock's now, floored to the minute so that reruns within a minute agree.
    """
    if end is not None:
        end_ms = to_ms(end)
    elif source == "simulate":
        end_ms = to_ms(config.live_start)
    else:
        assert clock is not None, "a lake run needs the world clock"
        end_ms = clock.now_ms() // MINUTE_MS * MINUTE_MS
    start_ms = max(end_ms - duration_ms(config.dataset.span), to_ms(config.world.start))
    return {"source": source, "start_ms": start_ms, "end_ms": end_ms}


def submit_etl(conn: Redis, config: DataConfig, source: Source, end: datetime | None = None) -> str | None:
    clock = AcceleratedClock.shared(conn, config) if source == "lake" and end is None else None
    return PipelineRunner(conn, config.pipeline).submit(
        etl_pipeline(config), etl_params(config, source, end, clock)
    )


def scheduled_etl() -> str | None:
    """Enqueued by the RQ cron scheduler: an etl run over the latest lake window, unless one is active."""
    job = get_current_job()
    settings = get_settings()
    conn = job.connection if job is not None else Redis.from_url(str(settings.queue_url))
    return submit_etl(conn, settings.data_config(), "lake")


def build_scheduler(conn: Redis, config: DataConfig) -> CronScheduler:
    """RQ's cron scheduler with the configured etl interval (wall time)."""
    every = config.pipeline.schedule_every
    if every is None:
        raise ValueError("pipeline.schedule_every is null: nothing to schedule")
    cron = CronScheduler(connection=conn)
    cron.register(scheduled_etl, queue_name=config.queues.features, interval=int(every.total_seconds()))
    return cron
