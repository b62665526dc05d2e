"""Reading the provisioned Grafana dashboards and Prometheus files (shared by the static and e2e tests)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO_ROOT

GRAFANA = REPO_ROOT / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DATASOURCES = GRAFANA / "provisioning" / "datasources"
PROMETHEUS = REPO_ROOT / "prometheus"


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str

    @property
    def name(self) -> str:
        return f"{self.dashboard}#{self.panel_id}{self.ref_id} {self.panel_title}"


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def datasource_uids() -> set[str]:
    uids = set()
    for path in DATASOURCES.glob("*.y*ml"):
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            uids.add(source["uid"])
    return uids


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries() -> list[PanelQuery]:
    found = []
    for path in dashboard_files():
        board = load(path)
        for panel in panels(board):
            for target in panel.get("targets", []):
                found.append(
                    PanelQuery(board["uid"], panel["id"], panel["title"], target["refId"], target["expr"])
                )
    return found


def annotation_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, annotation name, expr) of every Prometheus annotation."""
    found = []
    for path in dashboard_files():
        board = load(path)
        for annotation in board.get("annotations", {}).get("list", []):
            if "expr" in annotation:
                found.append((board["uid"], annotation["name"], annotation["expr"]))
    return found


def rules_file_of_every_query() -> str:
    """A Prometheus rules file with one recording rule per panel and annotation query, so that
    `promtool check rules` parses every PromQL expression the dashboards hold."""
    rules = [{"record": f"dashboard_query:{i}", "expr": q.expr} for i, q in enumerate(panel_queries())]
    rules += [
        {"record": f"dashboard_annotation:{i}", "expr": expr}
        for i, (_, _, expr) in enumerate(annotation_queries())
    ]
    return yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sort_keys=False)
