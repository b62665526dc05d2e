"""Time conventions: every timestamp in the system is int64 milliseconds since the Unix epoch, UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS


def to_ms(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous; attach a timezone")
    return round(value.timestamp() * 1000)


def from_ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def duration_ms(value: timedelta) -> int:
    return round(value.total_seconds() * 1000)


def iso(value: int | datetime) -> str:
    """Compact ISO-8601 (UTC, 'Z') for logs, reports and manifests."""
    moment = from_ms(value) if isinstance(value, int) else value.astimezone(UTC)
    return moment.isoformat().replace("+00:00", "Z")
