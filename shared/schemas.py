"""Data contracts shared by every service: event and catalog schemas (Arrow) and their enums."""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa


class EventType(StrEnum):
    IMPRESSION = "impression"
    CLICK = "click"
    LIKE = "like"
    HIDE = "hide"


EVENT_TYPES = tuple(e.value for e in EventType)

TS_TYPE = pa.timestamp("ms", tz="UTC")

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("dwell_ms", pa.int64(), nullable=True),  # clicks only
    ]
)
"""One engagement event. Every event refers to a served feed slot (request_id, position)."""

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("creator_id", pa.int64(), nullable=False),
        pa.field("topic_id", pa.int64(), nullable=False),
        pa.field("published_at", TS_TYPE, nullable=False),
    ]
)
"""One item as published by the content side."""

SERVED_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("model_version", pa.int64(), nullable=True),  # null when the fallback served
        pa.field("variant", pa.string(), nullable=False),
        pa.field("feature_version", pa.string(), nullable=False),
        pa.field("degraded", pa.bool_(), nullable=False),
        pa.field("ts", TS_TYPE, nullable=False),
    ]
)
"""One served slot of a feed, from the ranker's impression log: what the monitor joins with clicks."""

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # events | items | body
        pa.field("received_at", TS_TYPE, nullable=False),
        pa.field("reasons", pa.string(), nullable=False),  # ';'-joined rule names
        pa.field("raw", pa.string(), nullable=False),  # the record as received (JSON)
    ]
)
"""Rejected input, kept verbatim with the reasons, so nothing is ever silently dropped."""


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
