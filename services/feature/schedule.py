"""The feature service's schedule: RQ's cron scheduler refreshes the online store at a fixed interval."""

from __future__ import annotations

from redis import Redis
from rq import get_current_job
from rq.cron import CronScheduler

from shared.config import DataConfig
from shared.connections import queue_redis
from shared.dags import submit_refresh
from shared.settings import get_settings


def scheduled_refresh() -> str | None:
    """Enqueued by the RQ cron scheduler: the online store as of now, unless a refresh is active."""
    job = get_current_job()
    settings = get_settings()
    conn = job.connection if job is not None else queue_redis(settings)
    return submit_refresh(conn, settings.data_config())


def build_scheduler(conn: Redis, config: DataConfig) -> CronScheduler:
    """RQ's cron scheduler with the configured refresh interval (wall time)."""
    every = config.pipeline.schedule_every
    if every is None:
        raise ValueError("pipeline.schedule_every is null: nothing to schedule")
    cron = CronScheduler(connection=conn)
    cron.register(scheduled_refresh, queue_name=config.queues.features, interval=int(every.total_seconds()))
    return cron
