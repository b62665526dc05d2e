"""The ingest core: validate a batch, drop duplicates, store the rest, quarantine the bad, report.

Both front doors (HTTP `POST /events`, the backfill job) end up here, so the guarantees hold for
both: every received record is counted exactly once as stored, quarantined or duplicate; invalid
records are kept verbatim with their reasons; nothing half-written is ever visible in the lake;
and an event is acknowledged (returned as stored or duplicate) only once it is durably in the lake
(see services.ingest.dedup for how claims and the lake write are ordered).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from redis import Redis

from services.ingest import metrics
from services.ingest.dedup import Deduplicator
from shared import keys
from shared.clock import Clock
from shared.config import DataConfig
from shared.eventstream import encode_arrow
from shared.featurestore import pack_catalog
from shared.lake import Lake
from shared.schemas import CATALOG_SCHEMA, EVENT_SCHEMA
from shared.timeutil import iso, to_ms
from shared.validation import (
    EVENT_RULES,
    ITEM_RULES,
    RuleContext,
    evaluate,
    records_to_table,
    table_rows_as_json,
    to_json_lines,
)

log = structlog.get_logger(__name__)

Kind = Literal["events", "items"]
DUPLICATE = "duplicate"

_TRIM_CATALOG = """
local removed = 0
local function drop(members)
  for lo = 1, #members, 1000 do
    local chunk = {unpack(members, lo, math.min(lo + 999, #members))}
    redis.call('HDEL', KEYS[2], unpack(chunk))
    redis.call('ZREM', KEYS[1], unpack(chunk))
    removed = removed + #chunk
  end
end
drop(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[3])))
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if excess > 0 then
  drop(redis.call('ZRANGE', KEYS[1], 0, math.min(excess, tonumber(ARGV[3])) - 1))
end
return removed
"""
"""Bound the fresh pool (KEYS[1], scored by publish time) and the catalog hash (KEYS[2]) together:
items published before ARGV[1] go, then the oldest beyond ARGV[2] items; at most ARGV[3] a call."""

_TRIM_PER_CALL = 50_000


class IngestRefusedError(Exception):
    """A batch refused as a whole, for now or for good; nothing of it is acknowledged."""

    def __init__(self, status: int, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


@dataclass
class BatchReport:
    """What happened to one batch; received == stored + quarantined + duplicates, always."""

    batch_id: str
    kind: str
    source: str
    received: int
    stored: int
    quarantined: int
    duplicates: int
    received_at: str
    rule_failures: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def reconciles(self) -> bool:
        return self.received == self.stored + self.quarantined + self.duplicates

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Ingestor:
    def __init__(
        self, *, lake: Lake, queue_redis: Redis, store_redis: Redis, config: DataConfig, clock: Clock
    ) -> None:
        self.lake = lake
        self.queue_redis = queue_redis
        self.store_redis = store_redis
        self.config = config
        self.clock = clock
        self.dedup = Deduplicator(queue_redis, config.ingest.dedup_ttl, config.ingest.claim_ttl)
        self._trim_catalog = store_redis.register_script(_TRIM_CATALOG)

    def _context(self) -> RuleContext:
        return RuleContext(self.config.validation, self.clock.now_ms(), to_ms(self.config.world.start))

    # ------------------------------------------------------------------ events

    def events_from_records(self, records: Sequence[Any], batch_id: str, source: str) -> BatchReport:
        table, pre_reasons = records_to_table(records, EVENT_SCHEMA)
        return self._ingest_events(table, batch_id, source, pre_reasons, raw_records=records)

    def events_from_table(self, table: pa.Table, batch_id: str, source: str) -> BatchReport:
        return self._ingest_events(table.cast(EVENT_SCHEMA), batch_id, source, None, raw_records=None)

    def _ingest_events(
        self,
        table: pa.Table,
        batch_id: str,
        source: str,
        pre_reasons: Sequence[str] | None,
        raw_records: Sequence[Any] | None,
    ) -> BatchReport:
        started = time.perf_counter()
        received_ms = self.clock.now_ms()
        result = evaluate(table, EVENT_RULES, self._context(), pre_reasons)
        raw = (
            [to_json_lines([raw_records[i]])[0] for i in result.invalid_rows]
            if raw_records is not None
            else table_rows_as_json(table, result.invalid_rows)
        )
        valid = result.valid
        rows = _first_occurrences(valid)
        ids = pc.take(valid["event_id"], pa.array(rows, pa.int64())).to_pylist()
        ts = pc.take(valid["ts"], pa.array(rows, pa.int64())).cast(pa.int64()).to_numpy()
        claimed_at = time.monotonic()
        claims = self.dedup.claim(ids, ts, batch_id, self.lake.event_ids_in)
        if claims.busy.any():
            taken = np.flatnonzero(claims.taken_now)
            self.dedup.release([ids[i] for i in taken], ts[taken], batch_id)
            raise IngestRefusedError(
                409,
                f"{int(claims.busy.sum())} events of this batch are being stored by another batch right "
                "now; nothing was stored, retry",
                retry_after_s=1,
            )
        if time.monotonic() - claimed_at > self.dedup.claim_ttl_s / 2:
            raise IngestRefusedError(503, "claiming the batch's events took too long; retry", retry_after_s=1)
        if not claims.already_stored or claims.new.any():
            self.lake.write_events(valid.take(pa.array(rows[claims.own], pa.int64())), batch_id)
        self.lake.write_quarantine("events", batch_id, received_ms, result.invalid_reasons, raw)
        stored = valid.take(pa.array(rows[claims.new], pa.int64()))
        self._publish(stored, batch_id)
        self.dedup.commit(batch_id)
        report = BatchReport(
            batch_id=batch_id,
            kind="events",
            source=source,
            received=table.num_rows,
            stored=stored.num_rows,
            quarantined=len(result.invalid_rows),
            duplicates=valid.num_rows - stored.num_rows,
            received_at=iso(received_ms),
            rule_failures=dict(result.rule_failures),
            seconds=round(time.perf_counter() - started, 4),
        )
        self._record(report)
        return report

    def _publish(self, table: pa.Table, batch_id: str) -> None:
        """Valid events to the near-real-time stream, one entry per chunk of events."""
        if table.num_rows == 0:
            return
        chunk = self.config.ingest.stream_chunk_events
        with self.store_redis.pipeline(transaction=False) as pipe:
            for offset in range(0, table.num_rows, chunk):
                part = table.slice(offset, chunk)
                pipe.xadd(
                    keys.EVENT_STREAM,
                    {"batch_id": batch_id, "n": part.num_rows, "arrow": encode_arrow(part)},
                    maxlen=self.config.ingest.stream_maxlen,
                    approximate=True,
                )
            pipe.execute()

    # ------------------------------------------------------------------ catalog

    def items_from_records(self, records: Sequence[Any], batch_id: str, source: str) -> BatchReport:
        table, pre_reasons = records_to_table(records, CATALOG_SCHEMA)
        return self._ingest_items(table, batch_id, source, pre_reasons, raw_records=records)

    def items_from_table(self, table: pa.Table, batch_id: str, source: str) -> BatchReport:
        return self._ingest_items(table.cast(CATALOG_SCHEMA), batch_id, source, None, raw_records=None)

    def _ingest_items(
        self,
        table: pa.Table,
        batch_id: str,
        source: str,
        pre_reasons: Sequence[str] | None,
        raw_records: Sequence[Any] | None,
    ) -> BatchReport:
        """Catalog rows are upserts: a re-sent item replaces the previous row, so none is a duplicate."""
        started = time.perf_counter()
        received_ms = self.clock.now_ms()
        result = evaluate(table, ITEM_RULES, self._context(), pre_reasons)
        raw = (
            [to_json_lines([raw_records[i]])[0] for i in result.invalid_rows]
            if raw_records is not None
            else table_rows_as_json(table, result.invalid_rows)
        )
        valid = result.valid.cast(CATALOG_SCHEMA)
        self.lake.write_catalog(valid, batch_id, received_ms)
        self.lake.write_quarantine("items", batch_id, received_ms, result.invalid_reasons, raw)
        self._publish_catalog(valid)
        report = BatchReport(
            batch_id=batch_id,
            kind="items",
            source=source,
            received=table.num_rows,
            stored=valid.num_rows,
            quarantined=len(result.invalid_rows),
            duplicates=0,
            received_at=iso(received_ms),
            rule_failures=dict(result.rule_failures),
            seconds=round(time.perf_counter() - started, 4),
        )
        self._record(report)
        return report

    def _publish_catalog(self, items: pa.Table) -> None:
        """New items become servable before the next feature snapshot: catalog hash + fresh pool,
        both trimmed to `online_store.catalog_max_age` and `catalog_max_items` (snapshots carry
        older items), so neither grows without bound."""
        if items.num_rows == 0:
            return
        ids = items["item_id"].to_numpy()
        creators = items["creator_id"].to_numpy()
        topics = items["topic_id"].to_numpy()
        published = items["published_at"].cast(pa.int64()).to_numpy()
        with self.store_redis.pipeline(transaction=False) as pipe:
            packed = {
                int(i): pack_catalog(c, t, p)
                for i, c, t, p in zip(ids, creators, topics, published, strict=True)
            }
            for lo in range(0, len(ids), 5000):
                chunk = dict(list(packed.items())[lo : lo + 5000])
                pipe.hset(keys.CATALOG, mapping=chunk)
                pipe.zadd(
                    keys.FRESH_ITEMS,
                    {str(i): float(published[j]) for j, i in enumerate(ids[lo : lo + 5000], lo)},
                )
            store = self.config.online_store
            cutoff = self.clock.now_ms() - int(store.catalog_max_age.total_seconds() * 1000)
            self._trim_catalog(
                keys=[keys.FRESH_ITEMS, keys.CATALOG],
                args=[cutoff, store.catalog_max_items, _TRIM_PER_CALL],
                client=pipe,
            )
            pipe.execute()

    # ------------------------------------------------------------------ whole-body checks

    def bind_body(self, kind: Kind, batch_id: str, digest: str) -> None:
        """A batch id names one body: the first body sent under it wins, another one is a 409."""
        ttl_s = max(1, int(self.config.ingest.dedup_ttl.total_seconds()))
        first = self.queue_redis.set(keys.ingest_body(kind, batch_id), digest, nx=True, get=True, ex=ttl_s)
        if first is not None and first.decode() != digest:
            raise IngestRefusedError(
                409,
                f"Idempotency-Key {batch_id!r} was used for a different body; use a new key for new data",
            )

    def reject_body(self, kind: Kind, body: bytes, reason: str, batch_id: str) -> BatchReport:
        """A body that is not even a batch (bad JSON, wrong shape) is kept whole in the quarantine."""
        received_ms = self.clock.now_ms()
        text = body.decode("utf-8", errors="replace")
        self.lake.write_quarantine("body", batch_id, received_ms, [f"{kind}:{reason}"], [text])
        metrics.REJECTED_BODIES.labels(reason).inc()
        self.queue_redis.hincrby(keys.INGEST_TOTALS, "body:rejected", 1)
        log.warning("body_rejected", kind=kind, batch_id=batch_id, reason=reason, bytes=len(body))
        return BatchReport(batch_id, kind, "http", 0, 0, 0, 0, iso(received_ms), {reason: 1})

    # ------------------------------------------------------------------ accounting

    def _record(self, report: BatchReport) -> None:
        kind = report.kind
        metrics.BATCHES.labels(kind, report.source).inc()
        for outcome, value in (
            ("received", report.received),
            ("stored", report.stored),
            ("quarantined", report.quarantined),
            (DUPLICATE, report.duplicates),
        ):
            metrics.EVENTS.labels(kind, outcome).inc(value)
        for rule, count in report.rule_failures.items():
            metrics.RULE_FAILURES.labels(kind, rule).inc(count)
        metrics.BATCH_SECONDS.labels(kind).observe(report.seconds)
        with self.queue_redis.pipeline(transaction=False) as pipe:
            for outcome in ("received", "stored", "quarantined", "duplicates"):
                pipe.hincrby(keys.INGEST_TOTALS, f"{kind}:{outcome}", getattr(report, outcome))
            pipe.xadd(
                keys.INGEST_REPORTS,
                {"report": json.dumps(report.as_dict())},
                maxlen=self.config.ingest.reports_maxlen,
                approximate=True,
            )
            pipe.execute()
        log.info(
            "batch_ingested",
            **{k: v for k, v in report.as_dict().items() if k != "rule_failures"},
            rule_failures=report.rule_failures or None,
        )


def _first_occurrences(valid: pa.Table) -> np.ndarray:
    """Row indices of the first occurrence of each event id (later ones are in-batch duplicates)."""
    if valid.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    codes = pc.dictionary_encode(valid["event_id"]).combine_chunks()
    _, first = np.unique(codes.indices.to_numpy(), return_index=True)
    return np.sort(first).astype(np.int64)
