"""Ingest's pipeline steps (run by the ingest worker, enqueued by dotted path)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from services.ingest.backfill import backfill
from services.ingest.ingestion import Ingestor
from shared.clock import FixedClock
from shared.connections import lake, queue_redis, store_redis
from shared.settings import get_settings
from shared.timeutil import from_ms
from shared.world import World


def generate(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """etl step 1: with source=simulate, backfill the simulated history up to the window's end.

    With source=lake the events are already there (live traffic, the ranker's log): nothing to do.
    """
    if params["source"] != "simulate":
        return {"source": params["source"], "generated": 0}
    settings = get_settings()
    config = settings.data_config()
    ingestor = Ingestor(
        lake=lake(settings),
        queue_redis=queue_redis(settings),
        store_redis=store_redis(settings),
        config=config,
        clock=FixedClock(params["end_ms"]),
    )
    summary = backfill(
        ingestor,
        World.create(config),
        config.world.start,
        from_ms(params["end_ms"]),
        config.backfill.batch_events,
    )
    return {"source": "simulate", **asdict(summary)}
