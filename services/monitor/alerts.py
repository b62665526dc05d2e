"""Alerts as structured records: to a Redis stream, to the logs and, when configured, to a webhook.

A webhook that is down never fails a monitoring run: the alert is still in the stream and the logs.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import structlog
from redis import Redis

from shared import keys
from shared.config import AlertsConfig

log = structlog.get_logger(__name__)


def alert(
    severity: str,
    kind: str,
    what: str,
    value: float,
    threshold: float,
    window: dict[str, Any],
    **context: Any,
) -> dict[str, Any]:
    return {
        "severity": severity,
        "kind": kind,
        "what": what,
        "value": round(float(value), 6),
        "threshold": threshold,
        "window": window,
        **context,
    }


def publish(conn: Redis, alerts: list[dict[str, Any]], config: AlertsConfig, webhook_url: str | None) -> None:
    for record in alerts:
        conn.xadd(keys.ALERTS, {"alert": json.dumps(record)}, maxlen=config.stream_maxlen, approximate=True)
        (log.error if record["severity"] == "alert" else log.warning)("monitor_alert", **record)
    if webhook_url and alerts:
        try:
            httpx.post(webhook_url, json={"alerts": alerts}, timeout=config.webhook_timeout.total_seconds())
        except httpx.HTTPError as exc:
            log.warning("alert_webhook_failed", url=webhook_url, error=repr(exc))


def recent(conn: Redis, limit: int) -> list[dict[str, Any]]:
    return [json.loads(fields[b"alert"]) for _, fields in conn.xrevrange(keys.ALERTS, count=limit)]
