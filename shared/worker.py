"""Run an RQ worker the feedrank way: structured logs, Prometheus metrics, retries' scheduler on.

Call shared.multiproc.prepare_multiprocess_dir() before importing this module in a worker process.
"""

from __future__ import annotations

import importlib
import socket
import uuid

import structlog
from rq import Queue, Worker

from shared import metrics
from shared.connections import queue_redis
from shared.logging import configure
from shared.settings import Settings

log = structlog.get_logger(__name__)

STEP_MODULES = {
    "ingest": ("services.ingest.jobs",),
    "features": ("services.feature.jobs",),
    "training": ("services.trainer.jobs",),
    "monitoring": ("services.monitor.jobs", "services.monitor.gate"),
}
"""Queue name (config default) -> the module whose steps it runs, imported once by the worker."""


def run_worker(
    settings: Settings,
    queues: list[str],
    *,
    burst: bool = False,
    metrics_port: int | None = None,
) -> bool:
    """Work the queues until stopped (or until they are empty with burst). Returns True if it did work.

    The step modules of the queues are imported once here, in the parent: each job runs in a forked
    child, which then starts with torch, MLflow and pyarrow already loaded instead of paying seconds
    of imports per job.
    """
    configure(settings.log_level, settings.log_format)
    for queue in queues:
        for module in STEP_MODULES.get(queue, ()):
            importlib.import_module(module)
    if metrics_port:
        metrics.serve(metrics_port)
    conn = queue_redis(settings)
    worker = Worker(
        [Queue(name, connection=conn) for name in queues],
        connection=conn,
        name=f"{socket.gethostname()}-{'-'.join(queues)}-{uuid.uuid4().hex[:6]}",
    )
    log.info("worker_starting", queues=queues, burst=burst, metrics_port=metrics_port)
    return bool(worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level))
