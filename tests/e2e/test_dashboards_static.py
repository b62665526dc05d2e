"""Static checks of the observability files: no Docker needed, so they run with `make test` too.

That every query also parses in promtool and returns data from a live Prometheus is checked by the
e2e test (tests/e2e/test_stack.py), which has the Prometheus image at hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.e2e.dashboards import (
    DASHBOARDS,
    PROMETHEUS,
    annotation_queries,
    dashboard_files,
    datasource_uids,
    load,
    panel_queries,
    panels,
)
from tests.support import REPO_ROOT

EXPECTED_DASHBOARDS = {"feedrank-ranker", "feedrank-quality", "feedrank-pipelines"}


def test_the_three_dashboards_are_provisioned() -> None:
    assert {load(p)["uid"] for p in dashboard_files()} == EXPECTED_DASHBOARDS
    provider = yaml.safe_load((REPO_ROOT / "grafana/provisioning/dashboards/feedrank.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_is_consistent(path: Path) -> None:
    board = load(path)
    uids = datasource_uids()
    assert uids == {"feedrank-prometheus"}
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {board['uid']}"
    for panel in panels(board):
        assert panel["gridPos"]["x"] >= 0
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], f"panel {panel['title']} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"]["uid"] in uids


def test_dashboards_cover_the_issue() -> None:
    exprs = " ".join(q.expr for q in panel_queries())
    for metric in (
        "feedrank_ranker_requests_total",  # rps, errors
        "feedrank_ranker_request_seconds_bucket",  # p50/p95/p99
        "feedrank_ranker_fallbacks_total",
        "feedrank_ranker_stage_seconds_bucket",
        "feedrank_monitor_feature_psi",
        "feedrank_monitor_prediction_psi",
        "feedrank_monitor_online_ctr_ratio",
        "feedrank_monitor_alerts_active",
        "feedrank_pipeline_step_seconds_sum",
        "feedrank_pipeline_steps_total",
        "feedrank_pipeline_last_success_timestamp_seconds",
        'rq_jobs{status="queued"}',
    ):
        assert metric in exprs, metric
    assert any("promoted" in expr for _, _, expr in annotation_queries())


def test_queries_name_only_known_metrics() -> None:
    """Every feedrank_* metric a panel reads is defined somewhere in the services (a renamed metric
    would otherwise leave an empty panel)."""
    sources = "".join(p.read_text() for d in ("services", "shared") for p in (REPO_ROOT / d).rglob("*.py"))
    for query in panel_queries():
        for metric in set(re.findall(r"feedrank_[a-z0-9_]+", query.expr)):
            base = re.sub(r"_(bucket|sum|count|total)$", "", metric)
            online = base.removeprefix("feedrank_monitor_online_")
            defined = (
                f'"{base}"' in sources
                or f'"{metric}"' in sources
                or (online != base and f'("{online}"' in sources)
            )
            assert defined, f"{query.name}: {metric} is not defined by any service"


def test_alert_rules_cover_the_issue() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {
        "RankerP99LatencyHigh",
        "RankerErrorRateHigh",
        "RankerFallbackRateHigh",
        "DriftAlertActive",
        "RankerNoChampionLoaded",
        "QueueBacklog",
        "PipelineStepFailed",
        "ServedLogBehind",
    } <= names


def test_prometheus_scrapes_every_service() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    assert {
        "ranker",
        "ingest",
        "monitor",
        "feature-worker",
        "trainer-worker",
        "monitor-worker",
        "rq",
        "gateway",
        "ingest-drain",
    } <= jobs
    assert DASHBOARDS.is_dir()
