"""The closed loop, live: stable world -> drift -> alert -> retrain -> gate -> A/B -> recovery.

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
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
import numpy as np
from redis import Redis

from shared import keys
from shared.clock import AcceleratedClock
from shared.connections import lake
from shared.dags import submit_etl_then_train, submit_monitor
from shared.pipeline import PipelineRunner, RunView
from shared.registry import Registry
from shared.settings import Settings, get_settings
from shared.timeutil import iso
from shared.world.runtime import inject_drift, served_topic_counts
from tests.loopsim.drifts import SCENARIO_KNOB, abandoned_topics_swing
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
        self.spawn("worker-data", "services.feature", "worker", "--queues", "ingest", "features")
        self.spawn("worker-monitor", "services.monitor", "worker")  # never queued behind a refresh
        self.spawn("worker-training", "services.trainer", "worker")
        self.spawn("realtime", "services.feature", "realtime")
        self.spawn("drain", "services.ingest", "drain-served")
        self.spawn("scheduler", "services.feature", "scheduler")  # refreshes the online store
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
    stable_runs: int = 0  # runs before the injection (warm-up and baseline included)
    stable_alerts: int = 0
    drift: dict[str, Any] = field(default_factory=dict)
    detection_runs: int | None = None
    detection_sim_minutes: float | None = None
    retrain_runs: dict[str, str] | None = None
    gates: list[str] = field(default_factory=list)
    promotions: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: int = 0
    pre_drift_ctr_ratio: float | None = None
    worst_ctr_ratio: float | None = None
    recovered_ctr_ratio: float | None = None
    recovery_runs: int | None = None
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
    """The current champion's clicks per oracle-expected click in the window (its own rows: not a
    predecessor's, in the window of a promotion)."""
    return next(
        (
            q["ctr_ratio"]
            for q in report.get("quality", [])
            if q["variant"] == "champion" and q["model_version"] == report.get("champion_version")
        ),
        None,
    )


def served_topics(settings: Settings, since_ms: int, until_ms: int) -> np.ndarray:
    """How often each topic was served in [since, until), from the lake."""
    the_lake = lake(settings)
    return served_topic_counts(
        the_lake.read_served(since_ms, until_ms),
        the_lake.read_catalog(),
        settings.data_config().world.n_topics,
    )


class Cadence:
    """Monitoring runs every `interval_s` of wall time, as the monitor's schedule starts them."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.next_at = time.monotonic() + interval_s

    def wait(self) -> None:
        time.sleep(max(0.0, self.next_at - time.monotonic()))
        self.next_at = max(self.next_at + self.interval_s, time.monotonic())


def run_scenario(
    settings: Settings,
    stack: LiveStack | None = None,
    interval_s: float | None = None,
    quiet_runs: int = 1,
    detect_within: int = 3,
    recover_within: int = 16,
) -> ScenarioResult:
    """The scenario on a bootstrapped world (a champion is registered; the stack runs): a stable
    world until the champion's baseline is set (plus `quiet_runs`), then the scenario drift
    (tests/loopsim/drifts.py), then the loop on its own until the champion, whichever version it
    is by then, is back within the recovery tolerance of its pre-drift level, judged on a window
    that lies after the onset (or `recover_within` runs pass)."""
    conn = Redis.from_url(str(settings.queue_url))
    data, monitoring = settings.data_config(), settings.monitoring_config()
    registry = Registry(settings.mlflow_tracking_uri, settings.ranking_model_config().registry)
    timeline = Timeline(AcceleratedClock.shared(conn, data))
    result = ScenarioResult(timeline.entries)
    cadence = Cadence(interval_s or monitoring.schedule_every.total_seconds())
    champion = registry.by_alias("champion")
    assert champion is not None
    timeline.mark("stack_up", champion=champion.version)

    # 1. a stable world: warm-up, baseline, then runs that must not alert
    quiet = 0
    while quiet < quiet_runs:
        cadence.wait()
        if stack is not None:
            stack.check()
        view, report = monitor_once(conn, settings)
        alerts = [a for a in report.get("alerts", []) if a["severity"] == "alert"]
        look = report.get("quality_look") or {}
        timeline.mark(
            "monitor", phase="stable", status=report.get("status"),
            alerts=[f"{a['kind']}:{a['what']}" for a in alerts], ctr_ratio=champion_ratio(report),
            cusum=look.get("statistic"),
        )  # fmt: skip
        result.stable_runs += 1
        result.stable_alerts += len(alerts)
        if report.get("status") == "ok":
            quiet += 1
            result.pre_drift_ctr_ratio = report.get("baseline_ctr_ratio")

    # 2. the drift: users abandon the topics the champion served most in the last hour
    onset = timeline.clock.now_ms()
    result.drift = abandoned_topics_swing(served_topics(settings, onset - 3_600_000, onset))
    inject_drift(conn, data, SCENARIO_KNOB, onset, **result.drift)
    injected_wall_ms = int(time.time() * 1000)
    timeline.mark("drift_injected", knob=SCENARIO_KNOB, **result.drift)

    # 3. the loop on its own: detection, retrain, gate, A/B, promotion, recovery
    floor = (result.pre_drift_ctr_ratio or 0.0) * (1 - monitoring.quality.recovery_tolerance)
    runs_after = 0
    while runs_after < recover_within or (result.detection_runs is None and runs_after < detect_within):
        cadence.wait()
        if stack is not None:
            stack.check()
        view, report = monitor_once(conn, settings)
        runs_after += 1
        act = next((s.result for s in view.steps if s.name == "act"), None) or {}
        alerts = [a for a in report.get("alerts", []) if a["severity"] == "alert"]
        ratio = champion_ratio(report)
        look = report.get("quality_look") or {}
        timeline.mark(
            "monitor", status=report.get("status"), champion=report.get("champion_version"),
            alerts=[f"{a['kind']}:{a['what']}" for a in alerts], ctr_ratio=ratio, cusum=look.get("statistic"),
            act={k: (v.get("decision") if isinstance(v, dict) and "decision" in v else v) for k, v in act.items()},
        )  # fmt: skip
        if ratio is not None:
            result.worst_ctr_ratio = min(ratio, result.worst_ctr_ratio or ratio)
        if alerts and result.detection_runs is None:
            result.detection_runs = runs_after
            result.detection_sim_minutes = round((timeline.clock.now_ms() - onset) / 60_000, 1)
            timeline.mark("alert", runs_after_drift=runs_after, sim_minutes=result.detection_sim_minutes)
        if isinstance(act.get("retrain"), dict) and result.retrain_runs is None:
            result.retrain_runs = act["retrain"]
            timeline.mark("retrain_started", **act["retrain"])
        if result.detection_runs is None and runs_after >= detect_within:
            timeline.mark("no_alert", runs_after_drift=runs_after)
            break
        window_start = parse_ms(report.get("window", {}).get("start"))
        after_onset = window_start is not None and window_start >= onset
        if result.detection_runs is not None and after_onset and ratio is not None and ratio >= floor:
            result.recovered, result.recovered_ctr_ratio, result.recovery_runs = True, ratio, runs_after
            timeline.mark("recovered", ctr_ratio=ratio, floor=round(floor, 4), runs_after_drift=runs_after)
            break
    decisions = [
        json.loads(fields[b"entry"]) for _, fields in conn.xrange(keys.AUDIT, min=str(injected_wall_ms))
    ]
    result.gates = [d["kind"] for d in decisions if d["kind"].startswith("gate_")]
    result.promotions = [d for d in decisions if d["kind"] == "promoted"]
    result.rollbacks = sum(1 for d in decisions if d["kind"] == "rolled_back")
    return result


def parse_ms(value: str | None) -> int | None:
    if not value:
        return None
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


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
