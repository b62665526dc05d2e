"""The closed loop, live: stable world -> drift -> alert -> retrain -> gate -> A/B -> promotion.

Everything is real and runs as its own process: Redis, the RQ workers, the ranker and ingest over
HTTP, the real-time consumer, the impression-log drain, the traffic simulator; a real MLflow
store. The scenario drives the monitor (one run at a time, as its schedule would) and prints a
timeline. Run it by hand as a demo:

    .venv/bin/python -m tests.integration.scenario          # tiny world, private Redis, ~5 minutes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx
from redis import Redis

from shared import keys
from shared.clock import AcceleratedClock
from shared.dags import CANDIDATE, submit_etl_then_train, submit_monitor
from shared.pipeline import PipelineRunner, RunView
from shared.registry import Registry
from shared.settings import Settings, get_settings
from shared.timeutil import iso
from shared.world.runtime import inject_drift
from tests.support import REPO_ROOT, free_port, private_redis, run_worker


@dataclass
class Timeline:
    clock: AcceleratedClock
    out: TextIO = sys.stdout
    started: float = field(default_factory=time.monotonic)
    entries: list[dict[str, Any]] = field(default_factory=list)

    def mark(self, event: str, **data: Any) -> dict[str, Any]:
        entry = {
            "wall_s": round(time.monotonic() - self.started, 1),
            "sim": iso(self.clock.now_ms()),
            "event": event,
            **data,
        }
        self.entries.append(entry)
        details = " ".join(f"{k}={v}" for k, v in data.items())
        print(f"[{entry['wall_s']:7.1f}s | {entry['sim']}] {event:<24} {details}", file=self.out, flush=True)
        return entry


class LiveStack:
    """Every long-running part of feedrank as a process of its own, stopped (and logged) on exit."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.env = {**os.environ, **env}
        self.root = root
        self.ranker_url = f"http://127.0.0.1:{free_port()}"
        self.ingest_url = f"http://127.0.0.1:{free_port()}"
        self.env.update(FEEDRANK_RANKER_URL=self.ranker_url, FEEDRANK_INGEST_URL=self.ingest_url)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, *args: str) -> None:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        log = (self.root / "logs" / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def start(self) -> None:
        self.spawn("ranker", "services.ranker", "serve", "--port", self.ranker_url.rsplit(":", 1)[1])
        self.spawn("ingest", "services.ingest", "serve", "--port", self.ingest_url.rsplit(":", 1)[1])
        self.spawn(
            "worker-data", "services.feature", "worker", "--queues", "ingest", "features", "monitoring"
        )
        self.spawn("worker-training", "services.trainer", "worker")
        self.spawn("realtime", "services.feature", "realtime")
        self.spawn("drain", "services.ingest", "drain-served")
        self.spawn("scheduler", "services.feature", "scheduler")  # etl on the lake: fresh online features
        self.wait_ready(self.ranker_url)
        self.wait_ready(self.ingest_url)
        self.spawn("traffic", "services.traffic", "run")

    def wait_ready(self, url: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{url} never became ready (logs in {self.root / 'logs'})")

    def check(self) -> None:
        """Fail fast, with the log's tail, when a part of the stack died."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.root / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")

    def stop(self) -> None:
        for name in ("traffic", *[n for n in self.processes if n != "traffic"]):
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()

    def __enter__(self) -> LiveStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ScenarioResult:
    timeline: list[dict[str, Any]]
    stable_runs: int = 0
    stable_alerts: int = 0
    detection_runs: int | None = None
    detection_sim_minutes: float | None = None
    retrain_runs: dict[str, str] | None = None
    gate: str | None = None
    promoted_version: int | None = None
    alert_to_promotion_s: float | None = None
    pre_drift_ctr_ratio: float | None = None
    drifted_ctr_ratio: float | None = None
    recovered_ctr_ratio: float | None = None
    recovered: bool = False


def monitor_once(conn: Redis, settings: Settings, timeout_s: float = 120) -> tuple[RunView, dict[str, Any]]:
    monitoring = settings.monitoring_config()
    run_id = submit_monitor(conn, settings.data_config(), monitoring)
    if run_id is None:
        raise RuntimeError("a monitoring run is already active")
    view = PipelineRunner(conn, monitoring.pipeline).wait(run_id, timeout_s)
    if view.status != "finished":
        raise RuntimeError(
            f"monitoring run {run_id} {view.status}: {[(s.name, s.status, s.error) for s in view.steps]}"
        )
    report = json.loads(conn.get(keys.MONITOR_LATEST) or b"{}")
    return view, report


def champion_ratio(report: dict[str, Any]) -> float | None:
    """The current champion's clicks per oracle-expected click (not a predecessor's, in the window
    of a promotion)."""
    return next(
        (
            q["ctr_ratio"]
            for q in report.get("quality", [])
            if q["variant"] == "champion" and q["model_version"] == report.get("champion_version")
        ),
        None,
    )


def run_scenario(  # noqa: PLR0912 - one timeline, read top to bottom
    settings: Settings,
    knob: str = "topic_popularity",
    knob_params: dict[str, Any] | None = None,
    stable_runs: int = 4,
    interval_s: float = 6.0,
    max_drift_runs: int = 24,  # ~7 simulated hours at interval_s: two tiny 3h windows after the onset
    max_loop_s: float = 900.0,
    stack: LiveStack | None = None,
    stop_after: Literal["alert", "gate", "promotion", "recovery"] = "recovery",
) -> ScenarioResult:
    """The scenario on an already bootstrapped world (a champion is registered); the stack must run."""
    conn = Redis.from_url(str(settings.queue_url))
    data, monitoring = settings.data_config(), settings.monitoring_config()
    registry = Registry(settings.mlflow_tracking_uri, settings.ranking_model_config().registry)
    timeline = Timeline(AcceleratedClock.shared(conn, data))
    result = ScenarioResult(timeline.entries)
    timeline.mark("stack_up", champion=registry.by_alias("champion").version)  # type: ignore[union-attr]

    # 1. a stable world: the baseline, then runs that must not alert
    while result.stable_runs < stable_runs:
        time.sleep(interval_s)
        if stack is not None:
            stack.check()
        view, report = monitor_once(conn, settings)
        status = report.get("status")
        alerts = [a for a in report.get("alerts", []) if a["severity"] == "alert"]
        timeline.mark(
            "monitor",
            phase="stable",
            status=status,
            run=view.status,
            alerts=[f"{a['kind']}:{a['what']}" for a in alerts],
            ctr_ratio=champion_ratio(report),
            shortfall_p=report.get("ctr_shortfall_p"),
        )
        if status == "ok":
            result.stable_runs += 1
            result.stable_alerts += len(alerts)
            result.pre_drift_ctr_ratio = report.get("baseline_ctr_ratio")

    # 2. drift
    onset = timeline.clock.now_ms()
    injected_wall_ms = int(time.time() * 1000)
    inject_drift(conn, data, knob, onset, **(knob_params or {}))
    timeline.mark("drift_injected", knob=knob, params=knob_params or {})

    # 3. detection, retrain, gate, A/B, promotion, recovery: the monitor acts by itself
    deadline = time.monotonic() + max_loop_s
    runs_after = 0
    alert_at: float | None = None
    champion = registry.by_alias("champion")
    assert champion is not None
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        if stack is not None:
            stack.check()
        view, report = monitor_once(conn, settings)
        runs_after += 1
        act = next((s.result for s in view.steps if s.name == "act"), None) or {}
        alerts = [a for a in report.get("alerts", []) if a["severity"] == "alert"]
        ratio = champion_ratio(report)
        timeline.mark(
            "monitor", status=report.get("status"), alerts=[f"{a['kind']}:{a['what']}" for a in alerts],
            ctr_ratio=ratio, shortfall_p=report.get("ctr_shortfall_p"), act={k: (v.get("decision") if isinstance(v, dict) else v) for k, v in act.items()},
        )  # fmt: skip
        if alerts and result.detection_runs is None:
            result.detection_runs = runs_after
            result.detection_sim_minutes = round((timeline.clock.now_ms() - onset) / 60_000, 1)
            result.drifted_ctr_ratio = ratio
            alert_at = time.monotonic()
            timeline.mark("alert", runs_after_drift=runs_after, sim_minutes=result.detection_sim_minutes)
            if stop_after == "alert":
                break
        if "retrain" in act and isinstance(act["retrain"], dict):
            result.retrain_runs = act["retrain"]
            timeline.mark("retrain_started", **act["retrain"])
        if result.gate is None and (registry.by_alias("challenger") or _gate_failed(conn, injected_wall_ms)):
            challenger = registry.by_alias("challenger")
            result.gate = "passed" if challenger else "failed"
            timeline.mark("gate", result=result.gate, challenger=challenger.version if challenger else None)
            if stop_after == "gate":
                break
        current = registry.by_alias("champion")
        if current is not None and current.version != champion.version and result.promoted_version is None:
            result.promoted_version = current.version
            result.alert_to_promotion_s = round(time.monotonic() - (alert_at or time.monotonic()), 1)
            timeline.mark("promoted", version=current.version, ab=act.get("ab"))
            if stop_after == "promotion":
                break
        if (
            result.promoted_version is not None
            and report.get("champion_version") == result.promoted_version
            and ratio
        ):
            result.recovered_ctr_ratio = ratio
            if result.pre_drift_ctr_ratio:
                floor = result.pre_drift_ctr_ratio * (1 - monitoring.quality.recovery_tolerance)
                result.recovered = ratio >= floor
                timeline.mark(
                    "recovery_check",
                    ctr_ratio=ratio,
                    pre_drift=result.pre_drift_ctr_ratio,
                    floor=round(floor, 4),
                    recovered=result.recovered,
                )
                if result.recovered:
                    break
        if result.detection_runs is None and runs_after >= max_drift_runs:
            timeline.mark("no_alert", runs_after_drift=runs_after)
            break
        _ = CANDIDATE  # a candidate is between training and the gate; nothing to do but wait
    return result


def _gate_failed(conn: Redis, since_wall_ms: int) -> bool:
    """A gate failed after `since_wall_ms` (audit stream ids are wall milliseconds): a retrain of
    the stable phase is not the drift's."""
    entries = conn.xrevrange(keys.AUDIT, min=str(since_wall_ms), count=20)
    return any(json.loads(f[b"entry"])["kind"] == "gate_failed" for _, f in entries)


def bootstrap(settings: Settings, env: dict[str, str]) -> None:
    """etl then train through a burst worker: the world's history and a champion."""
    conn = Redis.from_url(str(settings.queue_url))
    chain = submit_etl_then_train(conn, settings.data_config(), settings.ranking_model_config(), "simulate")
    if chain is None:
        raise RuntimeError("a bootstrap run is already active")
    result = run_worker(env, ["ingest", "features", "training"])
    view = PipelineRunner(conn, settings.ranking_model_config().pipeline).run(chain[1])
    if result.returncode != 0 or view is None or view.status != "finished":
        raise RuntimeError(f"bootstrap failed: {result.stderr[-2000:]}")


@contextmanager
def scenario_environment(
    base_url: str, root: Path, queue_db: int = 5, store_db: int = 6
) -> Iterator[dict[str, str]]:
    env = {
        "FEEDRANK_QUEUE_URL": f"{base_url}/{queue_db}",
        "FEEDRANK_FEATURE_STORE_URL": f"{base_url}/{store_db}",
        "FEEDRANK_LAKE_PATH": str(root / "lake"),
        "FEEDRANK_PROFILE": "tiny",
        "FEEDRANK_LOG_FORMAT": "json",
        "FEEDRANK_LOG_LEVEL": "INFO",
        "FEEDRANK_MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow/mlflow.db",
        "FEEDRANK_MODEL_CACHE_DIR": str(root / "model-cache"),
        "FEEDRANK_ADMIN_TOKEN": "scenario-token",
        "PROMETHEUS_MULTIPROC_DIR": str(root / "metrics"),
    }
    for db in (queue_db, store_db):
        Redis.from_url(f"{base_url}/{db}").flushdb()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
    get_settings.cache_clear()
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


def main() -> int:
    keep = os.environ.get("FEEDRANK_SCENARIO_DIR")  # set it to keep the logs and lake afterwards
    with (
        private_redis(prefer_binary=True) as base,
        tempfile.TemporaryDirectory(prefix="feedrank-scenario-") as tmp,
    ):
        root = Path(keep) if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        with scenario_environment(base, root) as env:
            settings = get_settings()
            print("bootstrapping: etl + train on the tiny world ...", flush=True)
            bootstrap(settings, env)
            with LiveStack(env, root) as stack:
                result = run_scenario(settings, stack=stack)
        print(json.dumps({k: v for k, v in result.__dict__.items() if k != "timeline"}, indent=2))
    return 0 if result.recovered else 1


if __name__ == "__main__":
    sys.exit(main())
