"""End to end: the Compose stack, built and started from scratch, runs the whole loop.

    make e2e        # = pytest -m e2e tests/e2e (Docker and Compose v2 needed; ~10-20 minutes)

Every service but Grafana runs (CI has no Grafana image; its dashboards' queries are run against the
live Prometheus instead), with FEEDRANK_PROFILE=tiny and non-default host ports, in the Compose
project `feedrank-e2e`. The tests share one stack and run in file order: bootstrap -> /rank -> images
-> Prometheus targets -> dashboard queries parse -> scale-out -> drift -> recovery -> every panel
has data. The stack is removed with its volumes at the end (FEEDRANK_E2E_KEEP=1 keeps it; its logs
go to .run/e2e/logs when a test failed). Timings and image sizes: .run/e2e/report.json.

Knobs (environment): FEEDRANK_E2E_SKIP_BUILD=1, FEEDRANK_E2E_PROMOTION_TIMEOUT_S (default 1080),
FEEDRANK_E2E_PORT_OFFSET (host ports are 20000 + the usual port + offset), FEEDRANK_E2E_PROJECT
(default feedrank-e2e), FEEDRANK_E2E_LOOP=0 (skip the drift -> recovery test; the A/B and decision
panels, which need the loop, may then be empty).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from shared.config import load_monitoring_config
from tests.e2e.dashboards import PROMETHEUS, panel_queries, rules_file_of_every_query
from tests.support import REPO_ROOT

pytestmark = pytest.mark.e2e

PROJECT = os.environ.get("FEEDRANK_E2E_PROJECT", "feedrank-e2e")
PROMETHEUS_IMAGE = "prom/prometheus:v2.55.1"
OUT = REPO_ROOT / ".run" / "e2e"
OFFSET = int(os.environ.get("FEEDRANK_E2E_PORT_OFFSET", "0"))
PORTS = {
    name: 20000 + port + OFFSET
    for name, port in {
        "RANKER_PORT": 8000,
        "INGEST_PORT": 8001,
        "MONITOR_PORT": 8002,
        "MLFLOW_PORT": 5000,
        "PROMETHEUS_PORT": 9090,
        "GRAFANA_PORT": 3000,
        "RQ_DASHBOARD_PORT": 9181,
        "GATEWAY_STATS_PORT": 8404,
    }.items()
}
OPERATOR = ("e2e-operator", "e2e-ui-secret")
"""UI_USER and UI_PASSWORD of the stack: the operators' UIs answer 401 without them."""
NO_TORCH_SERVICES = ("ranker", "ingest", "feature-worker", "monitor-worker", "traffic")
IMAGES = ("feature", "trainer", "ingest", "ranker", "monitor", "traffic", "gateway", "rq-tools")
SCRAPE_JOBS = {
    "prometheus",
    "ranker",
    "gateway",
    "ingest",
    "monitor",
    "feature-worker",
    "trainer-worker",
    "monitor-worker",
    "rq",
}
PROMOTION_TIMEOUT_S = float(os.environ.get("FEEDRANK_E2E_PROMOTION_TIMEOUT_S", "1080"))
CHECK_LOOP = os.environ.get("FEEDRANK_E2E_LOOP", "1") != "0"
STABLE_RUNS_BEFORE_DRIFT = 3
"""Monitoring runs that judge the stable world against the champion's baseline before the injection."""
NEED_A_CHALLENGER = ("feedrank_monitor_ab_", "feedrank_monitor_decisions")
"""Panels whose metrics exist only once the loop has run: an A/B test, retrain/gate decisions."""

T = TypeVar("T")


@dataclass(repr=False)
class Stack:
    env: dict[str, str]
    report: dict[str, Any] = field(default_factory=dict)
    failed: bool = False

    def __repr__(self) -> str:  # tracebacks show it: never the environment (it may hold secrets)
        return f"Stack(project={PROJECT!r}, ports={PORTS})"

    def url(self, port_name: str) -> str:
        return f"http://127.0.0.1:{PORTS[port_name]}"

    def compose(
        self, *args: str, check: bool = True, timeout: float = 600, log: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = ["docker", "compose", "-p", PROJECT, *args]
        if log is not None:
            with log.open("w") as out:
                result = subprocess.run(
                    command, cwd=REPO_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                    text=True, timeout=timeout, check=False,
                )  # fmt: skip
            output = log.read_text()[-4000:]
            result = subprocess.CompletedProcess(command, result.returncode, output, "")
        else:
            result = subprocess.run(
                command, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True,
                timeout=timeout, check=False,
            )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def exec(self, service: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, *args, check=check, timeout=120)

    def timed(self, name: str, started: float) -> float:
        seconds = round(time.monotonic() - started, 1)
        self.report.setdefault("seconds", {})[name] = seconds
        print(f"e2e: {name}: {seconds} s", flush=True)
        return seconds

    def registry(self) -> list[dict[str, Any]]:
        out = self.exec("trainer-worker", "python", "-m", "services.trainer", "registry", "list", "--json")
        versions: list[dict[str, Any]] = json.loads(out.stdout[out.stdout.index("[") :])
        return versions

    def champion(self) -> int | None:
        return next((int(v["version"]) for v in self.registry() if "champion" in v["aliases"]), None)

    def prometheus(self, query: str) -> list[dict[str, Any]]:
        body = httpx.get(
            f"{self.url('PROMETHEUS_PORT')}/api/v1/query", params={"query": query}, auth=OPERATOR, timeout=10
        )
        payload = body.json()
        assert payload["status"] == "success", f"{query}: {payload}"
        result: list[dict[str, Any]] = payload["data"]["result"]
        return result

    def failing_monitor_runs(self, last: int = 4) -> list[str]:
        """Errors of the last `last` monitoring runs when every one of them failed, else []."""
        out = self.exec(
            "feature-worker", "python", "-m", "services.feature", "pipeline", "runs",
            "--name", "monitor", "--limit", str(2 * last), "--json",
        )  # fmt: skip
        runs = json.loads(out.stdout[out.stdout.index("[") :])
        runs = [r for r in runs if r["status"] in ("finished", "failed")][:last]
        if len(runs) < last or any(r["status"] != "failed" for r in runs):
            return []
        return [f"{r['run_id']}: {[s['error'] for s in r['steps'] if s.get('error')]}" for r in runs]

    def alerts(self, severity: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Alerts of that severity in the monitor's stream, newest first."""
        recent = httpx.get(f"{self.url('MONITOR_PORT')}/alerts", params={"limit": limit}, timeout=10).json()
        return [a for a in recent if a["severity"] == severity]

    def audit(self, limit: int = 30) -> list[dict[str, Any]]:
        out = self.exec("monitor", "python", "-m", "services.monitor", "audit", "--limit", str(limit))
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _parse_iso(value: str) -> float:
    """Seconds since the epoch of an ISO-8601 timestamp with its zone (Python 3.11 reads 'Z')."""
    return datetime.fromisoformat(value).timestamp()


def eventually(check: Callable[[], T | None], timeout_s: float, every_s: float = 2.0, what: str = "") -> T:
    """Call `check` until it returns something truthy (returned) or the time is up (AssertionError)."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, AssertionError, ValueError, KeyError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}: {last_error!r}")
        time.sleep(every_s)


def stack_env() -> dict[str, str]:
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        **os.environ,
        **{k: str(v) for k, v in PORTS.items()},
        "FEEDRANK_PROFILE": "tiny",
        "FEEDRANK_LOG_LEVEL": "INFO",
        "QUEUE_REDIS_PASSWORD": "e2e-queue-secret",
        "STORE_REDIS_PASSWORD": "e2e-store-secret",
        "RANKER_REDIS_PASSWORD": "e2e-ranker-secret",
        "TRAFFIC_REDIS_PASSWORD": "e2e-traffic-secret",
        "FEEDRANK_ADMIN_TOKEN": "e2e-admin-token",
        "GRAFANA_ADMIN_PASSWORD": "e2e-grafana",
        "UI_USER": OPERATOR[0],
        "UI_PASSWORD": OPERATOR[1],
        "RANKER_REPLICAS": "1",
        "GIT_SHA": sha or "unknown",
        "COMPOSE_PROGRESS": "plain",
    }


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode != 0:
        pytest.fail(
            'the e2e test needs Docker with Compose v2 (CI: eval "$(../shared/ci/docker-env.sh ...)")'
        )
    OUT.mkdir(parents=True, exist_ok=True)
    stack = Stack(stack_env())
    stack.compose("down", "-v", "--remove-orphans", check=False, timeout=180)
    started = time.monotonic()
    if os.environ.get("FEEDRANK_E2E_SKIP_BUILD") != "1":
        stack.compose("build", log=OUT / "build.log", timeout=3600)
        stack.timed("build_images", started)
    services = [s for s in stack.compose("config", "--services").stdout.split() if s != "grafana"]
    started = time.monotonic()
    # --wait returns once every service is healthy and the one-shot bootstrap (etl + train) has
    # exited 0; the ranker is healthy only when it serves a model.
    stack.compose("up", "-d", "--wait", "--wait-timeout", "1200", *services, log=OUT / "up.log", timeout=1500)
    stack.timed("up_until_champion_served", started)
    try:
        yield stack
    finally:
        stack.failed = request.session.testsfailed > 0
        if stack.failed:
            logs = OUT / "logs"
            logs.mkdir(exist_ok=True)
            for service in services:
                out = stack.compose("logs", "--no-color", "--tail", "400", service, check=False)
                (logs / f"{service}.log").write_text(out.stdout + out.stderr)
        (OUT / "report.json").write_text(json.dumps(stack.report, indent=2, default=str))
        print(f"e2e report: {json.dumps(stack.report, default=str)}", flush=True)
        if os.environ.get("FEEDRANK_E2E_KEEP") != "1":
            stack.compose("down", "-v", "--remove-orphans", check=False, timeout=300)


def test_bootstrap_registered_a_champion_that_the_ranker_serves(stack: Stack) -> None:
    bootstrap = stack.compose("logs", "--no-color", "bootstrap").stdout
    assert "register" in bootstrap, bootstrap[-2000:]
    champion = stack.champion()
    assert champion is not None
    response = httpx.post(f"{stack.url('RANKER_PORT')}/rank", json={"user_id": 17, "k": 5}, timeout=10)
    assert response.status_code == 200, response.text
    feed = response.json()
    assert feed["variant"] == "champion"
    assert feed["degraded"] is False
    assert feed["model_version"] == champion
    assert len(feed["items"]) == 5
    assert [i["position"] for i in feed["items"]] == list(range(5))
    invalid = httpx.post(f"{stack.url('RANKER_PORT')}/rank", json={"user_id": -1}, timeout=10)
    assert invalid.status_code == 422
    for port in ("INGEST_PORT", "MONITOR_PORT"):
        assert httpx.get(f"{stack.url(port)}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{stack.url('MLFLOW_PORT')}/health", auth=OPERATOR, timeout=10).status_code == 200
    assert httpx.get(f"{stack.url('RQ_DASHBOARD_PORT')}/", auth=OPERATOR, timeout=10).status_code == 200


def test_ports_are_local_and_the_operators_uis_need_the_password(stack: Stack) -> None:
    published = stack.compose("ps", "--format", "json").stdout.strip()
    rows = (
        json.loads(published)
        if published.startswith("[")
        else [json.loads(r) for r in published.splitlines()]
    )
    addresses = {p["URL"] for row in rows for p in row.get("Publishers") or [] if p.get("PublishedPort")}
    assert addresses == {"127.0.0.1"}, addresses  # BIND_ADDRESS: nothing published to the network
    locked = {
        "MLFLOW_PORT": "/health",
        "RQ_DASHBOARD_PORT": "/",
        "PROMETHEUS_PORT": "/api/v1/targets",
        "GATEWAY_STATS_PORT": "/stats",
    }
    for port, path in locked.items():
        anonymous = httpx.get(f"{stack.url(port)}{path}", timeout=10)
        assert anonymous.status_code == 401, (port, anonymous.status_code)
        wrong = httpx.get(f"{stack.url(port)}{path}", auth=(OPERATOR[0], "wrong"), timeout=10)
        assert wrong.status_code == 401, (port, wrong.status_code)
        assert httpx.get(f"{stack.url(port)}{path}", auth=OPERATOR, timeout=10).status_code == 200, port
    # Prometheus without its lifecycle API: nobody can shut it down or reload it over HTTP.
    quit_ = httpx.post(f"{stack.url('PROMETHEUS_PORT')}/-/quit", auth=OPERATOR, timeout=10)
    assert quit_.status_code == 403, quit_.status_code


def test_containers_run_with_least_privilege_and_limits(stack: Stack) -> None:
    for service in (*NO_TORCH_SERVICES, "trainer-worker", "gateway", "ui-proxy", "rq-dashboard"):
        container = stack.compose("ps", "-q", service).stdout.split()[0]
        inspected = subprocess.run(
            ["docker", "inspect", "-f", "{{json .HostConfig}}", container],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        host = json.loads(inspected.stdout)
        assert host["CapDrop"] == ["ALL"], (service, host["CapDrop"])
        assert "no-new-privileges:true" in (host["SecurityOpt"] or []), (service, host["SecurityOpt"])
        assert host["Memory"] > 0, (service, host["Memory"])
        assert host["NanoCpus"] > 0, (service, host["NanoCpus"])


def test_only_the_trainer_image_has_torch(stack: Stack) -> None:
    for service in NO_TORCH_SERVICES:
        shown = stack.exec(service, "pip", "show", "torch", check=False)
        assert shown.returncode != 0, f"{service} has torch installed"
        user = stack.exec(service, "id", "-u").stdout.strip()
        assert user != "0", f"{service} runs as root"
    cuda = stack.exec(
        "trainer-worker", "python", "-c", "import torch; print(torch.__version__, torch.version.cuda)"
    )
    assert cuda.stdout.split()[1] == "None", cuda.stdout
    tag = stack.env.get("FEEDRANK_IMAGE_TAG", "dev")
    sizes = {}
    for image in IMAGES:
        inspected = subprocess.run(
            ["docker", "image", "inspect", "-f", "{{.Size}}", f"feedrank/{image}:{tag}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        sizes[image] = f"{int(inspected.stdout) / 1e6:.0f} MB"
    stack.report["image_sizes"] = sizes


def test_prometheus_scrapes_every_target(stack: Stack) -> None:
    def all_up() -> dict[str, str] | None:
        body = httpx.get(f"{stack.url('PROMETHEUS_PORT')}/api/v1/targets", auth=OPERATOR, timeout=10).json()
        targets = body["data"]["activeTargets"]
        health = {f"{t['labels']['job']} {t['labels']['instance']}": t["health"] for t in targets}
        jobs = {t["labels"]["job"] for t in targets}
        assert jobs >= SCRAPE_JOBS, f"missing jobs: {SCRAPE_JOBS - jobs}"
        down = {k: v for k, v in health.items() if v != "up"}
        assert not down, f"targets not up: {down}"
        return health

    health = eventually(all_up, 90, every_s=3, what="every Prometheus target up")
    stack.report["scrape_targets"] = sorted(health)


def test_prometheus_files_and_dashboard_queries_pass_promtool(stack: Stack) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "queries.yml").write_text(rules_file_of_every_query())
        Path(tmp).chmod(0o755)
        (Path(tmp) / "queries.yml").chmod(0o644)
        for args in (
            ["-v", f"{PROMETHEUS}:/etc/prometheus:ro", "check", "config", "/etc/prometheus/prometheus.yml"],
            ["-v", f"{tmp}:/q:ro", "check", "rules", "/q/queries.yml"],
        ):
            mount, rest = args[:2], args[2:]
            result = subprocess.run(
                ["docker", "run", "--rm", *mount, "--entrypoint", "/bin/promtool", PROMETHEUS_IMAGE, *rest],
                capture_output=True, text=True, check=False, timeout=120,
            )  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr


def test_ranker_scales_out_behind_the_gateway(stack: Stack) -> None:
    stats = f"{stack.url('GATEWAY_STATS_PORT')}/metrics"

    def active_servers() -> float:
        for line in httpx.get(stats, timeout=10).text.splitlines():
            if line.startswith('haproxy_backend_active_servers{proxy="rankers"}'):
                return float(line.split()[-1])
        return 0.0

    started = time.monotonic()
    stack.compose("up", "-d", "--wait", "--no-deps", "--scale", "ranker=2", "ranker", timeout=600)
    eventually(lambda: active_servers() == 2, 60, what="2 ready rankers behind the gateway")
    stack.timed("scale_ranker_to_2", started)
    for user in range(40):
        response = httpx.post(f"{stack.url('RANKER_PORT')}/rank", json={"user_id": user, "k": 3}, timeout=10)
        assert response.status_code == 200
    served = {}
    for line in httpx.get(stats, timeout=10).text.splitlines():
        if line.startswith('haproxy_server_http_responses_total{proxy="rankers"') and 'code="2xx"' in line:
            served[line.split('server="')[1].split('"')[0]] = float(line.split()[-1])
    assert sum(1 for n in served.values() if n > 0) == 2, f"responses per ranker replica: {served}"
    stack.compose("up", "-d", "--wait", "--no-deps", "--scale", "ranker=1", "ranker", timeout=600)
    eventually(lambda: active_servers() == 1, 60, what="back to 1 ranker")


def _champion_ratio(report: dict[str, Any]) -> float | None:
    return next(
        (
            q["ctr_ratio"]
            for q in report.get("quality", [])
            if q["variant"] == "champion" and q["model_version"] == report.get("champion_version")
        ),
        None,
    )


def test_injected_drift_is_detected_acted_on_and_recovered(stack: Stack) -> None:
    """The loop through the stack, as tests/integration/test_scenario.py specifies it: the stable
    world raises no alert; the drift (a topic swing aimed at what the ranker serves most) is
    detected, the alert that starts the retrain judges a window that ends after the onset, and the
    champion gets back within the recovery tolerance of its pre-drift level on a window that lies
    after the onset. Promotions, if any, are A/B wins; nothing is rolled back."""
    if not CHECK_LOOP:
        pytest.skip("FEEDRANK_E2E_LOOP=0: the drift -> retrain -> A/B -> recovery loop is not checked")
    before = stack.champion()
    assert before is not None
    started = time.monotonic()
    quiet_runs: set[str] = set()
    baseline: dict[str, float] = {}

    def stable_world_judged_quiet() -> bool | None:
        # drift is measured against the champion's settled serving baseline: inject once it exists
        # and a few monitoring runs have judged the stable world against it
        report = httpx.get(f"{stack.url('MONITOR_PORT')}/report", timeout=10).json()
        if report.get("status") == "ok" and report.get("baseline_ctr_ratio"):
            quiet_runs.add(report["run_id"])
            baseline["ratio"] = report["baseline_ctr_ratio"]
        return True if len(quiet_runs) >= STABLE_RUNS_BEFORE_DRIFT else None

    eventually(stable_world_judged_quiet, 600, every_s=3, what="the champion's baseline and quiet runs")
    stack.timed("baseline_ready", started)
    false_alarms = stack.alerts(severity="alert")
    assert not false_alarms, f"the stable world raised alerts before any drift: {false_alarms}"
    injected_at = time.time()
    injected = stack.exec(
        "traffic", "python", "-m", "services.traffic", "inject-drift", "topic_popularity", "--against-served"
    )
    print(f"e2e: {injected.stdout.strip()}", flush=True)
    onset = injected.stdout.split("starts at sim time ", 1)[1].split(";", 1)[0]
    tolerance = load_monitoring_config(REPO_ROOT / "config", "tiny").quality.recovery_tolerance
    floor = baseline["ratio"] * (1 - tolerance)

    def recovered() -> float | None:
        failing = stack.failing_monitor_runs()
        if failing:
            pytest.fail(f"the last monitoring runs all failed, nothing can recover: {failing}")
        report = httpx.get(f"{stack.url('MONITOR_PORT')}/report", timeout=10).json()
        window_start = report.get("window", {}).get("start")
        ratio = _champion_ratio(report)
        retrained = any(e["kind"] == "retrain_triggered" for e in stack.audit(50))
        if (
            retrained
            and window_start
            and _parse_iso(window_start) >= _parse_iso(onset)
            and ratio
            and ratio >= floor
        ):
            return float(ratio)
        return None

    try:
        ratio = eventually(
            recovered, PROMOTION_TIMEOUT_S, every_s=10, what=f"a champion back above {floor:.3f}"
        )
    finally:
        entries = stack.audit(50)
        stack.report["audit"] = [f"{e.get('at')} {e.get('kind')}" for e in reversed(entries)]
        stack.report["registry"] = [(v["version"], v["aliases"]) for v in stack.registry()]
    stack.timed("drift_to_recovery", started)
    stack.report["recovery"] = {"pre_drift": baseline["ratio"], "floor": floor, "ratio": ratio,
                                "champion": stack.champion(), "before": before}  # fmt: skip
    retrains = [e for e in entries if e["kind"] == "retrain_triggered"]
    assert retrains, entries
    first_retrain = retrains[-1]
    assert _parse_iso(first_retrain["at"]) >= int(injected_at), first_retrain
    trigger = [a for a in stack.alerts(severity="alert") if a["monitor_run"] == first_retrain["monitor_run"]]
    assert trigger, f"no alert of {first_retrain['monitor_run']} in the stream"
    window = trigger[0]["window"]
    drifted_s = _parse_iso(window["end"]) - _parse_iso(onset)
    span_s = _parse_iso(window["end"]) - _parse_iso(window["start"])
    stack.report["trigger"] = {"alerts": [f"{a['kind']}:{a['what']}" for a in trigger], "window": window,
                               "onset": onset, "drifted_share_of_window": round(max(drifted_s, 0) / span_s, 3)}  # fmt: skip
    assert drifted_s > 0, (
        f"the retrain's alert judged a window that ended before the onset {onset}: {trigger}"
    )
    assert all(e["p_value"] <= e["alpha"] for e in entries if e["kind"] == "promoted"), entries
    assert not any(e["kind"] == "rolled_back" for e in entries), entries
    after = stack.champion()
    if after != before:  # the ranker follows the registry: the new champion is served
        eventually(
            lambda: (
                httpx.get(f"{stack.url('RANKER_PORT')}/readyz", timeout=5).json()["models"].get("champion")
                == after
            ),
            60,
            what=f"the ranker serving v{after}",
        )


def test_every_dashboard_panel_has_data(stack: Stack) -> None:
    # the A/B panels have data once the loop has A/B-tested a challenger (a gate let one through)
    ab_tested = CHECK_LOOP and any(e["kind"] == "gate_passed" for e in stack.audit(200))
    queries = [q for q in panel_queries() if ab_tested or not any(m in q.expr for m in NEED_A_CHALLENGER)]
    stack.report["ab_panels_checked"] = ab_tested

    def empty() -> list[str]:
        return [q.name for q in queries if not stack.prometheus(q.expr)]

    started = time.monotonic()
    missing: list[str] = []
    deadline = started + 120
    while True:
        missing = empty()
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(10)
    stack.report["panel_queries"] = {"total": len(queries), "without_data": missing}
    assert not missing, f"{len(missing)} of {len(queries)} panel queries return no data: {missing}"
