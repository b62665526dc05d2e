"""The monitor's pipeline steps, thin I/O around the pure assessment (assess.py) and decision rules
(rules.py): `assess` judges the serving window, `act` turns its alerts into retrains, rollbacks and
A/B decisions. (The retraining DAG's offline gate is gate.py.)

A registry that does not answer fails the step (RQ retries it); it is never read as "no alias",
so nothing is promoted, erased or retrained because a lookup failed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import structlog
from redis import Redis

from services.monitor import alerts, audit, report
from services.monitor.assess import (
    CHAMPION_VARIANT,
    Assessment,
    ChampionMemory,
    arm_samples,
    assess_window,
    join_served,
)
from services.monitor.rules import (
    AbState,
    ArmSample,
    ChampionTrack,
    QualityBaseline,
    RequestSample,
    RollbackWatch,
    decide_ab,
    stale_candidate,
)
from shared import keys
from shared.clock import AcceleratedClock
from shared.config import DataConfig, ModelConfig, MonitoringConfig
from shared.connections import lake, queue_redis
from shared.dags import submit_retrain
from shared.features import FeatureSpec
from shared.lake import Lake, write_parquet_atomic
from shared.modeltags import AB_RESULT_TAG, CANDIDATE_ALIAS, CHALLENGER_SINCE_TAG, GATE_TAG, PIPELINE_RUN_TAG
from shared.pipeline import TERMINAL, PipelineRunner
from shared.registry import Registry, VersionInfo
from shared.settings import Settings, get_settings
from shared.timeutil import duration_ms, iso
from shared.world.runtime import live_world

log = structlog.get_logger(__name__)


def _configs() -> tuple[Settings, DataConfig, ModelConfig, MonitoringConfig]:
    settings = get_settings()
    return settings, settings.data_config(), settings.ranking_model_config(), settings.monitoring_config()


def _registry(settings: Settings, model: ModelConfig) -> Registry:
    return Registry(settings.mlflow_tracking_uri, model.registry)


# --------------------------------------------------------------------------- champion memory


def _request_table(sample: RequestSample) -> pa.Table:
    return pa.table(
        {"user_id": sample.users, "ts": sample.ts, "clicks": sample.clicks, "expected": sample.expected}
    )


def _request_sample(table: pa.Table) -> RequestSample:
    return RequestSample(
        table["user_id"].to_numpy().astype("int64"),
        table["ts"].to_numpy().astype("int64"),
        table["clicks"].to_numpy().astype("float64"),
        table["expected"].to_numpy().astype("float64"),
    )


def load_memory(conn: Redis, the_lake: Lake, version: int) -> ChampionMemory:
    raw = conn.get(keys.monitor_track(version))
    track = ChampionTrack.from_dict(json.loads(raw)) if raw else None
    pending_path, reference_path = the_lake.baseline_requests_path(version), the_lake.baseline_path(version)
    pending = _request_sample(pq.read_table(pending_path)) if pending_path.exists() else RequestSample.empty()
    reference = pq.read_table(reference_path) if reference_path.exists() else None
    return ChampionMemory(track, pending, reference)


def save_memory(conn: Redis, the_lake: Lake, memory: ChampionMemory, new_reference: bool) -> None:
    if memory.track is None:
        return
    version = memory.track.version
    if new_reference and memory.reference is not None:
        write_parquet_atomic(memory.reference, the_lake.baseline_path(version))
    pending_path = the_lake.baseline_requests_path(version)
    if len(memory.pending_baseline):
        write_parquet_atomic(_request_table(memory.pending_baseline), pending_path)
    else:
        pending_path.unlink(missing_ok=True)
    conn.set(keys.monitor_track(version), json.dumps(memory.track.as_dict()))


def forget_champion(conn: Redis, the_lake: Lake, version: int) -> None:
    """A version (re)starting as champion is warmed up and measured afresh: its serving conditions
    (share of traffic, the world) changed since any earlier baseline."""
    conn.delete(keys.monitor_track(version))
    the_lake.baseline_path(version).unlink(missing_ok=True)
    the_lake.baseline_requests_path(version).unlink(missing_ok=True)


# --------------------------------------------------------------------------- assess


def assess(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Drift and quality of the serving window against the champion's own settled serving."""
    settings, data, model, monitoring = _configs()
    the_lake, conn = lake(settings), queue_redis(settings)
    start_ms, end_ms = params["start_ms"], params["end_ms"] - params["label_delay_ms"]
    examples = pq.read_table(the_lake.serving_window_path(run_id))
    joined = join_served(examples, the_lake.read_served(params["start_ms"], params["end_ms"]))
    champion = _registry(settings, model).by_alias(model.registry.champion_alias)
    version = champion.version if champion is not None else None
    memory = (
        load_memory(conn, the_lake, version)
        if version is not None
        else ChampionMemory(None, RequestSample.empty(), None)
    )
    outcome = assess_window(
        run_id, start_ms, end_ms, joined, live_world(data, conn),
        FeatureSpec.from_config(data).dense_names, version, memory, monitoring,
    )  # fmt: skip
    save_memory(conn, the_lake, outcome.memory, outcome.new_reference)
    requests = outcome.requests.get((CHAMPION_VARIANT, version or 0))
    if requests is not None:  # the champion's level now: a promotion's rollback reference
        write_parquet_atomic(
            _request_table(requests), the_lake.monitoring_run_dir(run_id) / "champion.parquet"
        )
    return _finish(conn, the_lake, outcome.assessment, settings, monitoring)


def _finish(
    conn: Redis, the_lake: Lake, result: Assessment, settings: Settings, monitoring: MonitoringConfig
) -> dict[str, Any]:
    document = {**result.as_dict(), "finished_at": time.time()}
    report.write(document, the_lake.monitoring_run_dir(result.run_id))
    conn.set(keys.MONITOR_LATEST, json.dumps(document, default=float))
    alerts.publish(conn, result.alerts, monitoring.alerts, settings.alert_webhook_url)
    return {
        "status": result.status,
        "impressions": result.impressions,
        "alerts": [a["kind"] for a in result.alerts if a["severity"] == "alert"],
        "warnings": len([a for a in result.alerts if a["severity"] == "warning"]),
        "cusum": (result.quality_look or {}).get("statistic"),
    }


# --------------------------------------------------------------------------- act


def act(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Roll back a promotion that made users worse off; clear a stale candidate; start a retrain on
    an alert (once per cooldown, after the retrain delay); decide a running A/B test."""
    settings, data, model, monitoring = _configs()
    conn, the_lake = queue_redis(settings), lake(settings)
    registry = _registry(settings, model)
    latest = json.loads(conn.get(keys.MONITOR_LATEST) or b"{}")
    firing = (
        [a for a in latest.get("alerts", []) if a["severity"] == "alert"]
        if latest.get("run_id") == run_id
        else []
    )
    now = AcceleratedClock.shared(conn, data).now_ms()
    outcome: dict[str, Any] = {}

    if any(a["kind"] == "promotion_regression" for a in firing):
        outcome["rollback"] = _roll_back(conn, the_lake, registry, monitoring, run_id, firing)
    candidate = registry.by_alias(CANDIDATE_ALIAS)
    if candidate is not None:
        stale = _clear_stale_candidate(conn, the_lake, registry, candidate, monitoring, now)
        if stale is not None:
            outcome["stale_candidate"] = stale
            candidate = None
    challenger = registry.by_alias(model.registry.challenger_alias)
    pending = json.loads(conn.get(keys.RETRAIN_PENDING) or b"null")
    triggers = [a for a in firing if a["kind"] in monitoring.retrain.triggers]
    # one retrain at a time: none while one runs, waits for its gate, or is being A/B tested
    busy = (
        challenger is not None or candidate is not None or _retrain_in_flight(conn, data, model, monitoring)
    )
    if triggers and not busy and pending is None:
        outcome["retrain"], pending = _schedule_retrain(conn, the_lake, monitoring, run_id, triggers, now)
    elif triggers and busy:
        outcome["retrain"] = "in_flight"
    if pending is not None and not busy:
        started = _start_due_retrain(conn, the_lake, pending, now, data, model, monitoring)
        if started != "waiting" or "retrain" not in outcome:  # keep "scheduled" on the alert's run
            outcome["retrain"] = started
    if challenger is not None:
        outcome["ab"] = _decide_ab(conn, the_lake, registry, model, monitoring, challenger, data, now, run_id)
        conn.set(keys.MONITOR_AB, json.dumps({**outcome["ab"], "at": time.time()}, default=float))
    return outcome


def _retrain_in_flight(
    conn: Redis, data: DataConfig, model: ModelConfig, monitoring: MonitoringConfig
) -> bool:
    """The retrain last started still has a run (dataset, train, gate) that has not ended."""
    active = json.loads(conn.get(keys.RETRAIN_ACTIVE) or b"{}")
    runners = {
        "dataset": PipelineRunner(conn, data.pipeline),
        "train": PipelineRunner(conn, model.pipeline),
        "gate": PipelineRunner(conn, monitoring.pipeline),
    }
    for name, runner in runners.items():
        status = runner.run_status(active[name]) if active.get(name) else None
        if status is not None and status not in TERMINAL:
            return True
    return False


def _schedule_retrain(
    conn: Redis,
    the_lake: Lake,
    monitoring: MonitoringConfig,
    run_id: str,
    firing: list[dict[str, Any]],
    now: int,
) -> tuple[str, dict[str, Any] | None]:
    if conn.exists(keys.ROLLBACK_COOLDOWN):
        return "rollback_cooldown", None
    cooldown = int(monitoring.retrain.cooldown.total_seconds())
    if not conn.set(keys.RETRAIN_COOLDOWN, run_id, nx=True, ex=cooldown):
        return "cooldown", None
    reason = "; ".join(f"{a['kind']}:{a['what']}" for a in firing)
    due_ms = now + duration_ms(monitoring.retrain.delay)
    pending: dict[str, Any] = {"reason": reason, "due_ms": due_ms, "monitor_run": run_id}
    conn.set(keys.RETRAIN_PENDING, json.dumps(pending))
    audit.record(
        conn,
        the_lake.root,
        "retrain_scheduled",
        reason=reason,
        due=iso(due_ms),
        monitor_run=run_id,
    )
    return "scheduled", pending


def _start_due_retrain(
    conn: Redis,
    the_lake: Lake,
    pending: dict[str, Any],
    now: int,
    data: DataConfig,
    model: ModelConfig,
    monitoring: MonitoringConfig,
) -> dict[str, str] | str:
    """Submit the retrain once its delay has passed (the world's new data is in the lake)."""
    if now < pending["due_ms"]:
        return "waiting"
    runs = submit_retrain(conn, data, model, monitoring, pending["reason"])
    if runs is None:
        return "busy"
    conn.delete(keys.RETRAIN_PENDING)
    conn.set(keys.RETRAIN_ACTIVE, json.dumps({**runs, "reason": pending["reason"], "at": time.time()}))
    audit.record(
        conn, the_lake.root, "retrain_triggered", reason=pending["reason"], runs=runs,
        monitor_run=pending["monitor_run"],
    )  # fmt: skip
    return runs


def _clear_stale_candidate(
    conn: Redis,
    the_lake: Lake,
    registry: Registry,
    candidate: VersionInfo,
    monitoring: MonitoringConfig,
    now: int,
) -> dict[str, Any] | None:
    """A candidate whose gate crashed, timed out or never ran would block retraining forever:
    clear it, tag it, audit it, and schedule the retrain again (now, without a new alert)."""
    active = json.loads(conn.get(keys.RETRAIN_ACTIVE) or b"{}")
    gate_status = None
    if active.get("train") == candidate.tags.get(PIPELINE_RUN_TAG) and active.get("gate"):
        gate_status = PipelineRunner(conn, monitoring.pipeline).run_status(active["gate"])
    age_ms = int(time.time() * 1000) - candidate.created_ms
    why = stale_candidate(gate_status, age_ms, duration_ms(monitoring.retrain.candidate_timeout))
    if why is None:
        return None
    registry.remove_alias(CANDIDATE_ALIAS)
    registry.set_version_tag(candidate.version, GATE_TAG, "stale")
    reason = f"retry after stale candidate v{candidate.version}"
    conn.set(keys.RETRAIN_PENDING, json.dumps({"reason": reason, "due_ms": now, "monitor_run": None}))
    audit.record(
        conn, the_lake.root, "stale_candidate_cleared", candidate_version=candidate.version, why=why,
        gate_run=active.get("gate"), gate_status=gate_status,
    )  # fmt: skip
    return {"version": candidate.version, "why": why}


def _roll_back(
    conn: Redis,
    the_lake: Lake,
    registry: Registry,
    monitoring: MonitoringConfig,
    run_id: str,
    firing: list[dict[str, Any]],
) -> dict[str, Any]:
    """The promoted champion does worse than the one it replaced: put the previous one back."""
    alert = next(a for a in firing if a["kind"] == "promotion_regression")
    before, after = roll_back_champion(
        conn, the_lake, registry, monitoring, automatic=True, ctr_ratio=alert["value"],
        reference_ratio=alert.get("reference_ratio"), cusum=alert.get("cusum"), monitor_run=run_id,
    )  # fmt: skip
    return {"from_version": before, "to_version": after}


def roll_back_champion(
    conn: Redis, the_lake: Lake, registry: Registry, monitoring: MonitoringConfig, automatic: bool, **why: Any
) -> tuple[int, int]:
    """The one rollback, by hand (CLI) or by the monitor: champion back to the previous champion,
    both versions' tracks forgotten (each starts afresh when it serves as champion), a cooldown
    in which no retrain starts, and an audit entry."""
    before, after = registry.rollback()
    forget_champion(conn, the_lake, before)
    forget_champion(conn, the_lake, after)
    conn.set(keys.ROLLBACK_COOLDOWN, "1", ex=max(1, int(monitoring.rollback.cooldown.total_seconds())))
    audit.record(
        conn, the_lake.root, "rolled_back", automatic=automatic, from_version=before, to_version=after, **why
    )
    return before, after


def _decide_ab(
    conn: Redis,
    the_lake: Lake,
    registry: Registry,
    model: ModelConfig,
    monitoring: MonitoringConfig,
    challenger: VersionInfo,
    data: DataConfig,
    now: int,
    run_id: str,
) -> dict[str, Any]:
    """The A/B rule on every user served since the challenger started; promote, reject or wait."""
    champion = registry.by_alias(model.registry.champion_alias)
    if champion is None:
        registry.promote(challenger.version)
        audit.record(
            conn, the_lake.root, "promoted", challenger_version=challenger.version, why="no champion"
        )
        return {"decision": "promoted", "why": "no champion"}
    if not challenger.tags.get(CHALLENGER_SINCE_TAG):
        # a challenger set by hand (or by a gate that crashed before tagging it): its test starts now
        registry.set_version_tag(challenger.version, CHALLENGER_SINCE_TAG, str(now))
        audit.record(
            conn, the_lake.root, "challenger_test_started", challenger_version=challenger.version, at_ms=now
        )
        return {
            "decision": "collecting",
            "why": "the challenger's test starts now",
            "challenger_version": challenger.version,
        }
    since = int(challenger.tags[CHALLENGER_SINCE_TAG])
    until = now - duration_ms(monitoring.windows.label_delay)
    served = the_lake.read_served(since, until)
    engagements = the_lake.read_events(since, until + duration_ms(data.features.label_window),
                                       ["event_type", "request_id", "position"])  # fmt: skip
    arms = arm_samples(served, engagements)
    control = arms.get(("champion", champion.version), ArmSample.empty())
    treatment = arms.get(("challenger", challenger.version), ArmSample.empty())
    state_key = keys.monitor_ab_state(challenger.version)
    saved = json.loads(conn.get(state_key) or b"{}")
    # one experiment per (version, start): a version tested again starts from a clean slate
    state = AbState.from_dict(saved["state"]) if saved.get("since") == since else AbState()
    state, decision = decide_ab(state, control, treatment, max(0, until - since), monitoring.ab)
    conn.set(state_key, json.dumps({"since": since, "state": state.as_dict()}))
    figures = {
        "champion_version": champion.version,
        "challenger_version": challenger.version,
        **decision.figures,
        "why": decision.why,
    }
    if decision.decision == "promote":
        reference = _champion_level(the_lake, run_id)
        registry.promote(challenger.version)
        registry.set_version_tag(challenger.version, AB_RESULT_TAG, "won")
        _start_probation(conn, the_lake, challenger.version, champion.version, reference, now, monitoring)
        audit.record(conn, the_lake.root, "promoted", **figures)
        return {"decision": "promoted", **figures}
    if decision.decision == "reject":
        registry.remove_alias(model.registry.challenger_alias)
        registry.set_version_tag(challenger.version, AB_RESULT_TAG, "lost")
        audit.record(conn, the_lake.root, "challenger_rejected", **figures)
        return {"decision": "rejected", **figures}
    return {"decision": "collecting", **figures}


def _champion_level(the_lake: Lake, run_id: str) -> QualityBaseline | None:
    """The outgoing champion's clicks per oracle-expected click in this run's window."""
    path = the_lake.monitoring_run_dir(run_id) / "champion.parquet"
    if not path.exists():
        return None
    requests = _request_sample(pq.read_table(path))
    if not len(requests):
        return None
    return QualityBaseline.from_requests(requests, int(requests.ts.min()), int(requests.ts.max()) + 1)


def _start_probation(
    conn: Redis,
    the_lake: Lake,
    version: int,
    previous: int,
    reference: QualityBaseline | None,
    now: int,
    monitoring: MonitoringConfig,
) -> None:
    """The new champion starts a track of its own, watched against the champion it replaced."""
    forget_champion(conn, the_lake, version)
    watch = (
        RollbackWatch(previous, reference, now, now + duration_ms(monitoring.rollback.probation))
        if reference is not None
        else None
    )
    track = ChampionTrack(version, now, rollback=watch)
    conn.set(keys.monitor_track(version), json.dumps(track.as_dict()))
