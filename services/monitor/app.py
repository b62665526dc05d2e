"""The monitor's HTTP side: Prometheus gauges of the latest report, the report, alerts and audit.

The numbers are computed by the monitoring pipeline's jobs; this process only exports the latest
report (a custom collector reads it from Redis at scrape time), so a scrape never recomputes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis

from services.monitor import alerts, audit
from shared import keys
from shared.connections import queue_redis
from shared.http_guard import harden
from shared.logging import configure
from shared.settings import Settings, get_settings

LEVELS = {"ok": 0, "warning": 1, "alert": 2}


class LatestReportCollector(Collector):
    def __init__(self, conn: Redis) -> None:
        self.conn = conn

    def collect(self) -> Iterator[Metric]:
        report = json.loads(self.conn.get(keys.MONITOR_LATEST) or b"{}")
        ab = json.loads(self.conn.get(keys.MONITOR_AB) or b"{}")
        psi = GaugeMetricFamily(
            "feedrank_monitor_feature_psi", "PSI per feature vs the serving baseline.", labels=["feature"]
        )
        ks = GaugeMetricFamily("feedrank_monitor_feature_ks", "KS statistic per feature.", labels=["feature"])
        level = GaugeMetricFamily(
            "feedrank_monitor_feature_drift_level", "0 ok, 1 warning, 2 alert.", labels=["feature"]
        )
        for f in report.get("features", []):
            psi.add_metric([f["feature"]], f["psi"])
            level.add_metric([f["feature"]], LEVELS[f["level"]])
            if f.get("ks") is not None:
                ks.add_metric([f["feature"]], f["ks"])
        prediction = GaugeMetricFamily(
            "feedrank_monitor_prediction_psi", "PSI of served scores vs the version's baseline.",
            labels=["variant", "model_version"],
        )  # fmt: skip
        for key, value in report.get("prediction_psi", {}).items():
            variant, version = key.split("/")
            prediction.add_metric([variant, version], value)
        quality = {
            name: GaugeMetricFamily(
                f"feedrank_monitor_online_{name}", help_text, labels=["variant", "model_version"]
            )
            for name, help_text in (
                ("ctr", "Online CTR from delayed labels."),
                ("auc", "Online AUC of served scores vs clicks."),
                ("ece_top_slot", "Calibration error of the top slot."),
                ("oracle_auc", "AUC of the oracle on the same impressions."),
                ("ctr_ratio", "Clicks / clicks of the oracle's own feeds (best of the live catalog)."),
                ("impressions", "Impressions judged in the window."),
            )
        }
        for q in report.get("quality", []):
            labels = [q["variant"], str(q["model_version"])]
            for name, family in quality.items():
                family.add_metric(labels, q[name])
        active = GaugeMetricFamily(
            "feedrank_monitor_alerts_active", "Alerts firing in the latest run.", labels=["kind"]
        )
        for kind in ("feature_drift", "prediction_drift", "quality"):
            active.add_metric(
                [kind],
                sum(1 for a in report.get("alerts", []) if a["kind"] == kind and a["severity"] == "alert"),
            )
        status_gauge = GaugeMetricFamily(
            "feedrank_monitor_insufficient_data", "1 when the last window was too small."
        )
        status_gauge.add_metric([], 1.0 if report.get("status") == "insufficient_data" else 0.0)
        last = GaugeMetricFamily(
            "feedrank_monitor_last_run_timestamp_seconds", "Wall time of the latest report."
        )
        last.add_metric([], report.get("finished_at", 0.0))
        baseline = GaugeMetricFamily(
            "feedrank_monitor_baseline_ctr_ratio", "The champion's baseline ctr_ratio."
        )
        baseline.add_metric([], report.get("baseline_ctr_ratio") or 0.0)
        ab_ctr = GaugeMetricFamily(
            "feedrank_monitor_ab_ctr", "Online CTR per variant in the running A/B test.", labels=["variant"]
        )
        ab_p = GaugeMetricFamily(
            "feedrank_monitor_ab_p_value", "One-sided p-value: challenger CTR > champion CTR."
        )
        if ab:
            ab_ctr.add_metric(["champion"], ab.get("champion_ctr") or 0.0)
            ab_ctr.add_metric(["challenger"], ab.get("challenger_ctr") or 0.0)
            ab_p.add_metric([], ab.get("p_value") if ab.get("p_value") == ab.get("p_value") else 1.0)
        decisions = CounterMetricFamily(
            "feedrank_monitor_decisions", "Decisions taken by kind.", labels=["kind"]
        )
        for kind, count in (self.conn.hgetall(keys.DECISIONS) or {}).items():
            decisions.add_metric([kind.decode()], int(count))
        yield from (
            psi,
            ks,
            level,
            prediction,
            *quality.values(),
            active,
            status_gauge,
            last,
            baseline,
            ab_ctr,
            ab_p,
            decisions,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    conn = queue_redis(settings)
    registry = CollectorRegistry()
    registry.register(LatestReportCollector(conn))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure(settings.log_level, settings.log_format)
        yield

    app = FastAPI(title="feedrank monitor", version="1", lifespan=lifespan)
    http = settings.data_config().http
    harden(app, http.max_body_bytes, http.body_timeout.total_seconds())

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        try:
            conn.ping()
        except Exception as exc:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"queue Redis unreachable: {exc}"
            ) from None
        return {"status": "ready"}

    @app.get("/report")
    def latest_report() -> dict[str, Any]:
        """The latest monitoring report (drift, quality, alerts)."""
        report: dict[str, Any] = json.loads(conn.get(keys.MONITOR_LATEST) or b"{}")
        return report

    @app.get("/alerts")
    def recent_alerts(limit: int = 50) -> list[dict[str, Any]]:
        return alerts.recent(conn, max(1, min(limit, 1000)))

    @app.get("/audit")
    def recent_decisions(limit: int = 50) -> list[dict[str, Any]]:
        return audit.entries(conn, max(1, min(limit, 1000)))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
