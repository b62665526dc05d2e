"""Drain the ranker's impression log (a Redis stream) into the lake, for the monitor.

Entries are read through a consumer group and acknowledged only after their Parquet file is in
place; a crash replays the unacknowledged entries into a file named after the same first entry,
so the lake never loses a served feed and rarely (a different batch boundary on replay) repeats
one, which readers remove by (request_id, position).
"""

from __future__ import annotations

import json
import socket

import pyarrow as pa
import structlog
from redis import Redis
from redis.exceptions import ResponseError

from shared import keys
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


class ServedDrain:
    def __init__(self, conn: Redis, lake: Lake, batch: int = 500, consumer: str | None = None) -> None:
        self.conn = conn
        self.lake = lake
        self.batch = batch
        self.consumer = consumer or socket.gethostname()
        try:
            conn.xgroup_create(keys.SERVED_STREAM, keys.SERVED_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def drain_once(self, block_ms: int | None = None) -> int:
        """Write one batch (own pending entries first, then new ones); returns served feeds written."""
        written = 0
        for start in ("0", ">"):
            response = self.conn.xreadgroup(
                keys.SERVED_GROUP, self.consumer, {keys.SERVED_STREAM: start}, count=self.batch,
                block=block_ms if start == ">" else None,
            )  # fmt: skip
            for _, read in response or []:
                entries = [(entry_id, fields) for entry_id, fields in read if fields]
                if not entries:
                    continue
                table = entries_to_table(entries)
                self.lake.write_served(table, entries[0][0].decode().replace("-", "_"))
                self.conn.xack(keys.SERVED_STREAM, keys.SERVED_GROUP, *(entry_id for entry_id, _ in entries))
                written += len(entries)
        return written

    def run_forever(self, block_ms: int = 2000) -> None:
        log.info("served_drain_started", consumer=self.consumer)
        while True:
            written = self.drain_once(block_ms)
            if written:
                log.debug("served_drained", feeds=written)
