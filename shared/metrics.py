"""Prometheus helpers shared by the services.

HTTP services run in one process and use the default registry. RQ workers fork a child per job,
so they run in prometheus-client's multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` must be set before
prometheus_client is imported (shared.multiproc, called first by the worker entry points), the
children write to mmap files in that directory, and the worker's parent serves the aggregate.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from shared.multiproc import MULTIPROC_ENV

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
"""Fine enough to read a p99 anywhere between 1 ms and 100 ms."""

JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
"""Pipeline steps take from under a second to an hour."""


def registry() -> CollectorRegistry:
    """The registry to expose: the aggregate of all processes in multiprocess mode, else the default."""
    if os.environ.get(MULTIPROC_ENV):
        aggregate = CollectorRegistry()
        MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
        return aggregate
    return REGISTRY


def serve(port: int) -> None:
    """Expose /metrics on a background thread (workers and CLIs; FastAPI apps mount their own)."""
    start_http_server(port, registry=registry())
