"""Backfill: simulate the world's history and ingest it through the same path as live events."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import structlog

from services.ingest.ingestion import BatchReport, Ingestor
from shared.timeutil import iso, to_ms
from shared.world import SessionSimulator, World

log = structlog.get_logger(__name__)


@dataclass
class BackfillSummary:
    start: str
    end: str
    batches: int = 0
    received: int = 0
    stored: int = 0
    quarantined: int = 0
    duplicates: int = 0
    catalog_items: int = 0
    seconds: float = 0.0
    rule_failures: dict[str, int] = field(default_factory=dict)

    def add(self, report: BatchReport) -> None:
        self.batches += 1
        self.received += report.received
        self.stored += report.stored
        self.quarantined += report.quarantined
        self.duplicates += report.duplicates
        for rule, count in report.rule_failures.items():
            self.rule_failures[rule] = self.rule_failures.get(rule, 0) + count


def backfill(
    ingestor: Ingestor, world: World, start: datetime, end: datetime, batch_events: int
) -> BackfillSummary:
    """Ingest the catalog visible at `end`, then the events of [start, end) in deterministic batches.

    A batch id names its first chunk, so a rerun produces the same batches and ingest's
    dedup turns a rerun into a no-op instead of doubling the lake.
    """
    started = time.perf_counter()
    summary = BackfillSummary(start=iso(start), end=iso(end))
    seed = world.config.seed
    catalog = world.catalog_until(end)
    report = ingestor.items_from_table(
        pa.table(catalog), f"sim{seed}-catalog-{to_ms(end)}", source="backfill"
    )
    summary.catalog_items = report.stored
    total_ms = max(to_ms(end) - to_ms(start), 1)
    pending: list[pa.Table] = []
    pending_rows, first_chunk = 0, None

    def flush() -> None:
        nonlocal pending, pending_rows
        batch = pa.concat_tables(pending)
        summary.add(ingestor.events_from_table(batch, f"sim{seed}-{first_chunk}", source="backfill"))
        pending, pending_rows = [], 0
        elapsed = time.perf_counter() - started
        log.info(
            "backfill_progress",
            done=f"{min(chunk.end_ms - to_ms(start), total_ms) / total_ms:.0%}",
            events=summary.received,
            events_per_s=round(summary.received / max(elapsed, 1e-9)),
        )

    for chunk in SessionSimulator(world).run(start, end):
        if not pending:
            first_chunk = chunk.start_ms
        pending.append(chunk.events)
        pending_rows += chunk.events.num_rows
        if pending_rows >= batch_events:
            flush()
    if pending_rows:
        flush()
    summary.seconds = round(time.perf_counter() - started, 3)
    log.info("backfill_done", **{k: v for k, v in summary.__dict__.items() if k != "rule_failures"})
    return summary
