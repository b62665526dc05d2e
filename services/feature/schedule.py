"""The feature service's schedule: RQ's cron scheduler enqueues an etl trigger at a fixed interval."""

from __future__ import annotations

from redis import Redis
from rq import get_current_job
from rq.cron import CronScheduler

from shared.config import DataConfig
from shared.connections import queue_redis
from shared.dags import submit_etl
from shared.settings import get_settings


def scheduled_etl() -> str | None:
    """Enqueued by the RQ cron scheduler: an etl run over the latest lake window, unless one is active."""
    job = get_current_job()
    settings = get_settings()
    conn = job.connection if job is not None else queue_redis(settings)
    return submit_etl(conn, settings.data_config(), "lake")


def build_scheduler(conn: Redis, config: DataConfig) -> CronScheduler:
    """RQ's cron scheduler with the configured etl interval (wall time)."""
    every = config.pipeline.schedule_every
    if every is None:
        raise ValueError("pipeline.schedule_every is null: nothing to schedule")
    cron = CronScheduler(connection=conn)
    cron.register(scheduled_etl, queue_name=config.queues.features, interval=int(every.total_seconds()))
    return cron
