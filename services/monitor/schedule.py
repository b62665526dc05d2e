"""The monitor's schedule: RQ's cron scheduler enqueues a trigger every monitoring.schedule_every."""

from __future__ import annotations

from redis import Redis
from rq import get_current_job
from rq.cron import CronScheduler

from shared.config import DataConfig, MonitoringConfig
from shared.connections import queue_redis
from shared.dags import submit_monitor
from shared.settings import get_settings


def scheduled_monitor() -> str | None:
    """Enqueued by the cron scheduler: one monitoring run, unless one is active."""
    job = get_current_job()
    settings = get_settings()
    conn = job.connection if job is not None else queue_redis(settings)
    return submit_monitor(conn, settings.data_config(), settings.monitoring_config())


def build_scheduler(conn: Redis, data: DataConfig, monitoring: MonitoringConfig) -> CronScheduler:
    cron = CronScheduler(connection=conn)
    cron.register(
        scheduled_monitor,
        queue_name=data.queues.monitoring,
        interval=int(monitoring.schedule_every.total_seconds()),
    )
    return cron
