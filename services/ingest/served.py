"""Drain the ranker's impression log (a Redis stream) into the lake, for the monitor.

Entries are read through a consumer group and acknowledged only after their Parquet file is in
place; a crash replays the unacknowledged entries into a file named after the same first entry,
so the lake never loses a served feed and rarely (a different batch boundary on replay) repeats
one, which readers remove by (request_id, position).

Nothing is lost to trimming or to a drain that goes away:

* the ranker writes without a length cap; the drain trims the stream itself, and only below the
  oldest entry that some consumer group has not acknowledged (XTRIM MINID);
* the drain has a stable consumer name (config `ingest.served_drain.consumer`), so a recreated
  container finds its own pending entries, and it claims entries that any other consumer left
  pending for longer than `claim_idle` (XAUTOCLAIM);
* how far it is behind is exported (`feedrank_served_stream_*`), with an alert on the age of the
  oldest served feed not yet in the lake.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pyarrow as pa
import structlog
from redis import Redis
from redis.exceptions import RedisError, ResponseError

from services.ingest import metrics
from shared import keys
from shared.config import ServedDrainConfig
from shared.lake import Lake
from shared.schemas import SERVED_SCHEMA

log = structlog.get_logger(__name__)


def entries_to_table(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> pa.Table:
    """One row per served slot, from stream entries written by services.ranker.impressions."""
    columns: dict[str, list[object]] = {name: [] for name in SERVED_SCHEMA.names}
    for _, fields in entries:
        record = {k.decode(): v.decode() for k, v in fields.items()}
        items = json.loads(record["items"])
        n = len(items)
        version = json.loads(record["model_version"]) if record["model_version"] != "None" else None
        columns["request_id"] += [record["request_id"]] * n
        columns["user_id"] += [int(record["user_id"])] * n
        columns["item_id"] += items
        columns["position"] += json.loads(record["positions"])
        columns["score"] += json.loads(record["scores"])
        columns["model_version"] += [version] * n
        columns["variant"] += [record["variant"]] * n
        columns["feature_version"] += [record["feature_version"]] * n
        columns["degraded"] += [json.loads(record["degraded"])] * n
        columns["ts"] += [int(record["ts"])] * n
    arrays = [
        pa.array(columns[f.name], type=pa.int64()).cast(f.type)
        if f.name == "ts"
        else pa.array(columns[f.name], f.type)
        for f in SERVED_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=SERVED_SCHEMA)


def _decoded(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _order(entry_id: str) -> tuple[int, int]:
    """A stream id as (milliseconds, sequence), for comparisons."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Backlog:
    """How far the consumer groups are behind the stream."""

    length: int  # entries in the stream
    lag: int  # entries no group has been handed yet (the slowest group)
    pending: int  # handed to a consumer, not acknowledged (all groups)
    oldest_unacked: str | None  # id of the oldest entry some group still needs; None: none

    def oldest_age_s(self, now_ms: int) -> float:
        if self.oldest_unacked is None:
            return 0.0
        return max(0.0, (now_ms - _order(self.oldest_unacked)[0]) / 1000)


class ServedDrain:
    def __init__(
        self, conn: Redis, lake: Lake, config: ServedDrainConfig, consumer: str | None = None
    ) -> None:
        self.conn = conn
        self.lake = lake
        self.config = config
        self.batch = config.batch
        self.consumer = consumer or config.consumer
        self._observed_at = 0.0
        try:
            conn.xgroup_create(keys.SERVED_STREAM, keys.SERVED_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim_orphans(self) -> int:
        """Take over entries other consumers left pending for longer than `claim_idle` (a drain that
        crashed, or one recreated under another name); they are written with our own pending."""
        idle_ms = int(self.config.claim_idle.total_seconds() * 1000)
        claimed, start = 0, "0-0"
        while True:  # (redis-py drops the scan cursor with justid=True, so entries come back whole)
            start, entries, *_ = self.conn.xautoclaim(
                keys.SERVED_STREAM,
                keys.SERVED_GROUP,
                self.consumer,
                idle_ms,
                start_id=start,
                count=self.batch,
            )
            claimed += len(entries)
            if _decoded(start) == "0-0":
                break
        if claimed:
            metrics.SERVED_CLAIMED.inc(claimed)
            log.warning("served_entries_claimed", entries=claimed, consumer=self.consumer)
        return claimed

    def drain_once(self, block_ms: int | None = None) -> int:
        """Write one batch (orphans and own pending entries first, then new ones), trim what every
        group acknowledged; returns served feeds written."""
        self.claim_orphans()
        written = 0
        for start in ("0", ">"):
            response = self.conn.xreadgroup(
                keys.SERVED_GROUP, self.consumer, {keys.SERVED_STREAM: start}, count=self.batch,
                block=block_ms if start == ">" else None,
            )  # fmt: skip
            for _, read in response or []:
                entries = [(entry_id, fields) for entry_id, fields in read if fields]
                if entries:
                    table = entries_to_table(entries)
                    self.lake.write_served(table, entries[0][0].decode().replace("-", "_"))
                    written += len(entries)
                if read:  # entries trimmed away by someone else come back empty: nothing to write
                    self.conn.xack(keys.SERVED_STREAM, keys.SERVED_GROUP, *(entry_id for entry_id, _ in read))
        metrics.SERVED_WRITTEN.inc(written)
        self.trim()
        return written

    def backlog(self) -> Backlog:
        """Length, lag, pending and the oldest entry some group has not acknowledged."""
        length = int(self.conn.xlen(keys.SERVED_STREAM))
        lag, pending, unacked = 0, 0, []
        for group in self.conn.xinfo_groups(keys.SERVED_STREAM):
            pending += int(group["pending"])
            if int(group["pending"]):
                unacked.append(_decoded(self.conn.xpending(keys.SERVED_STREAM, group["name"])["min"]))
            undelivered = self.conn.xrange(
                keys.SERVED_STREAM, min=f"({_decoded(group['last-delivered-id'])}", count=1
            )
            if undelivered:
                unacked.append(_decoded(undelivered[0][0]))
            group_lag = group.get("lag")
            lag = max(lag, int(group_lag) if group_lag is not None else length)
        return Backlog(length, lag, pending, min(unacked, key=_order) if unacked else None)

    def trim(self) -> int:
        """Drop entries every group has acknowledged, and nothing else (XTRIM MINID)."""
        oldest = self.backlog().oldest_unacked
        if oldest is None:  # everything delivered is acknowledged: trim up to the slowest group
            groups = self.conn.xinfo_groups(keys.SERVED_STREAM)
            if not groups:
                return 0  # nobody reads the stream yet: keep everything
            last = min((_decoded(g["last-delivered-id"]) for g in groups), key=_order)
            oldest = f"{_order(last)[0]}-{_order(last)[1] + 1}"
        return int(self.conn.xtrim(keys.SERVED_STREAM, minid=oldest, approximate=False))

    def observe(self, every_s: float = 5.0) -> Backlog | None:
        """Export the backlog as gauges (at most every `every_s`)."""
        now = time.monotonic()
        if now - self._observed_at < every_s:
            return None
        self._observed_at = now
        backlog = self.backlog()
        metrics.SERVED_LENGTH.set(backlog.length)
        metrics.SERVED_LAG.set(backlog.lag)
        metrics.SERVED_PENDING.set(backlog.pending)
        metrics.SERVED_OLDEST_AGE.set(backlog.oldest_age_s(int(time.time() * 1000)))
        return backlog

    def run_forever(self) -> None:
        """Drain until stopped; a failing Redis or lake (disk full) is retried, entries stay pending."""
        block_ms = int(self.config.block.total_seconds() * 1000)
        log.info("served_drain_started", consumer=self.consumer)
        failures = 0
        while True:
            started = time.monotonic()
            try:
                written = self.drain_once(block_ms)
                self.observe()
                failures = 0
            except (RedisError, OSError) as exc:
                failures += 1
                log.warning("served_drain_retry", error=repr(exc), failures=failures)
                time.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            if written:
                log.debug("served_drained", feeds=written)
                # entries wait in the stream meanwhile: the next file holds all of them
                time.sleep(max(0.0, self.config.every.total_seconds() - (time.monotonic() - started)))
