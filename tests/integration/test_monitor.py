"""The monitor against a trained tiny world: a real RQ worker, a real MLflow store, the real lake.

The full drift -> retrain -> gate -> A/B -> promotion loop runs in test_scenario.py; here each
decision is pinned down on its own, with data built so that the right answer is known."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest

from services.monitor import alerts, audit
from services.monitor.app import create_app
from services.monitor.jobs import act
from shared import keys
from shared.clock import AcceleratedClock
from shared.connections import lake
from shared.dags import submit_monitor, submit_train
from shared.modeltags import AB_RESULT_TAG, CANDIDATE_ALIAS, CHALLENGER_SINCE_TAG, GATE_TAG
from shared.pipeline import PipelineRunner
from shared.registry import Registry
from shared.schemas import EVENT_SCHEMA, SERVED_SCHEMA
from tests.integration.conftest import TrainedWorld
from tests.support import REPO_ROOT, run_worker, serve_app

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000


def registry_of(world: TrainedWorld) -> Registry:
    return Registry(world.settings.mlflow_tracking_uri, world.settings.ranking_model_config().registry)


def monitor_cli(world: TrainedWorld, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.monitor", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **world.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_ab_traffic(
    world: TrainedWorld,
    at_ms: int,
    arms: dict[tuple[str, int], tuple[int, float]],
    seed: int = 0,
    users: int = 2000,
) -> None:
    """Served slots (the ranker's log) and their clicks: per (variant, version), N slots at a CTR,
    from `users` users (each arm its own: the A/B splits users)."""
    rng = np.random.default_rng(seed)
    served: list[pa.Table] = []
    clicks: list[pa.Table] = []
    for arm_index, ((variant, version), (impressions, ctr)) in enumerate(arms.items()):
        slots = 20
        requests = [f"req-{variant}-{uuid.uuid4().hex[:12]}" for _ in range(impressions // slots)]
        n = len(requests) * slots
        request_ids = np.repeat(requests, slots)
        positions = np.tile(np.arange(slots, dtype=np.int32), len(requests))
        ts = pa.array(np.full(n, at_ms, dtype=np.int64), pa.timestamp("ms", tz="UTC"))
        served.append(
            pa.Table.from_pydict(
                {
                    "request_id": request_ids,
                    "user_id": np.repeat(arm_index * users + rng.integers(0, users, len(requests)), slots),
                    "item_id": rng.integers(0, 100, n),
                    "position": positions,
                    "score": rng.random(n).astype(np.float32),
                    "model_version": np.full(n, version),
                    "variant": np.full(n, variant),
                    "feature_version": np.full(n, "fv-test"),
                    "degraded": np.zeros(n, dtype=bool),
                    "ts": ts,
                },
                schema=SERVED_SCHEMA,
            )
        )
        clicked = rng.random(n) < ctr
        m = int(clicked.sum())
        clicks.append(
            pa.Table.from_pydict(
                {
                    "event_id": [uuid.uuid4().hex for _ in range(m)],
                    "event_type": np.full(m, "click"),
                    "user_id": np.zeros(m, dtype=np.int64),
                    "item_id": np.zeros(m, dtype=np.int64),
                    "request_id": request_ids[clicked],
                    "position": positions[clicked],
                    "ts": pa.array(
                        np.full(m, at_ms + MINUTE_MS, dtype=np.int64), pa.timestamp("ms", tz="UTC")
                    ),
                    "dwell_ms": np.full(m, 5_000, dtype=np.int64),
                },
                schema=EVENT_SCHEMA,
            )
        )
    the_lake = lake(world.settings)
    the_lake.write_served(pa.concat_tables(served), f"test-{uuid.uuid4().hex[:8]}")
    the_lake.write_events(pa.concat_tables(clicks), f"test-{uuid.uuid4().hex[:8]}")


def test_a_window_with_too_few_impressions_is_insufficient_data_never_an_alert(
    trained_world: TrainedWorld,
) -> None:
    settings = trained_world.settings
    data, monitoring = settings.data_config(), settings.monitoring_config()
    run_id = submit_monitor(trained_world.queue, data, monitoring)
    assert run_id is not None
    result = run_worker(trained_world.env, [data.queues.features, data.queues.monitoring])
    assert result.returncode == 0, result.stderr[-3000:]
    view = PipelineRunner(trained_world.queue, monitoring.pipeline).run(run_id)
    assert view is not None
    assert view.status == "finished", [(s.name, s.status, s.error) for s in view.steps]
    assess = next(s for s in view.steps if s.name == "assess")
    assert assess.result is not None
    assert assess.result["status"] == "insufficient_data"
    assert assess.result["alerts"] == []
    assert alerts.recent(trained_world.queue, 10) == []
    report = json.loads(monitor_cli(trained_world, "report").stdout)
    assert report["run_id"] == run_id
    assert report["status"] == "insufficient_data"

    with serve_app(create_app(settings)) as url:
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "feedrank_monitor_insufficient_data 1.0" in metrics
    assert 'feedrank_monitor_alerts_active{kind="feature_drift"} 0.0' in metrics


def _fresh_served_log(world: TrainedWorld) -> None:
    """Each A/B test writes its own impression log: none of another test's traffic may count."""
    shutil.rmtree(lake(world.settings).served_dir, ignore_errors=True)


def _act_on(world: TrainedWorld, run_id: str) -> dict[str, Any]:
    """One act step with no alert firing: only the A/B decision (and housekeeping) runs."""
    world.queue.set(keys.MONITOR_LATEST, json.dumps({"run_id": run_id, "alerts": []}))
    return act({}, run_id)


def test_ab_test_keeps_collecting_then_promotes_a_winner_and_one_command_rolls_back(
    trained_world: TrainedWorld,
) -> None:
    settings = trained_world.settings
    data, model, monitoring = (
        settings.data_config(),
        settings.ranking_model_config(),
        settings.monitoring_config(),
    )
    registry = registry_of(trained_world)
    champion = registry.by_alias("champion")
    assert champion is not None
    # a second model: with a champion in place, a plain train run registers a challenger
    train_run = submit_train(trained_world.queue, model, data)
    assert train_run is not None
    result = run_worker(trained_world.env, [data.queues.training])
    assert result.returncode == 0, result.stderr[-3000:]
    challenger = registry.by_alias("challenger")
    assert challenger is not None
    assert challenger.version == champion.version + 1

    now = AcceleratedClock.shared(trained_world.queue, data).now_ms()
    judged_until = now - int(monitoring.windows.label_delay.total_seconds() * 1000)
    since = judged_until - 60 * MINUTE_MS
    registry.set_version_tag(challenger.version, CHALLENGER_SINCE_TAG, str(since))
    _fresh_served_log(trained_world)
    few_users = monitoring.ab.min_users // 2  # each user sees one feed of 20 slots
    write_ab_traffic(
        trained_world, since + MINUTE_MS,
        {("champion", champion.version): (20 * few_users, 0.05), ("challenger", challenger.version): (20 * few_users, 0.10)},
        users=few_users,
    )  # fmt: skip
    decision = _act_on(trained_world, "monitor-ab-1")["ab"]
    assert decision["decision"] == "collecting"  # below the minimum number of users, even with a big lift
    assert "users" in decision["why"]
    assert registry.by_alias("champion").version == champion.version  # type: ignore[union-attr]

    write_ab_traffic(
        trained_world, since + 2 * MINUTE_MS,
        {("champion", champion.version): (40_000, 0.05), ("challenger", challenger.version): (40_000, 0.10)},
        seed=1,
    )  # fmt: skip
    decision = _act_on(trained_world, "monitor-ab-2")["ab"]
    assert decision["decision"] == "promoted"
    assert decision["p_value"] < monitoring.ab.alpha
    assert decision["challenger_ctr"] > decision["champion_ctr"]
    assert registry.by_alias("champion").version == challenger.version  # type: ignore[union-attr]
    assert registry.by_alias("challenger") is None
    assert registry.get(challenger.version).tags[AB_RESULT_TAG] == "won"

    promoted = audit.entries(trained_world.queue, 5)[0]
    assert promoted["kind"] == "promoted"
    assert promoted["challenger_users"] >= monitoring.ab.min_users
    shown = monitor_cli(trained_world, "audit", "--limit", "1")
    assert json.loads(shown.stdout.splitlines()[0])["kind"] == "promoted"

    rolled = monitor_cli(trained_world, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert f"from version {challenger.version} to version {champion.version}" in rolled.stdout
    assert registry.by_alias("champion").version == champion.version  # type: ignore[union-attr]
    entry = audit.entries(trained_world.queue, 1)[0]
    assert (entry["kind"], entry["automatic"]) == ("rolled_back", False)
    trained_world.queue.delete(keys.ROLLBACK_COOLDOWN)


def test_ab_test_rejects_a_challenger_without_a_lift_once_its_time_is_up(trained_world: TrainedWorld) -> None:
    settings = trained_world.settings
    data, model, monitoring = (
        settings.data_config(),
        settings.ranking_model_config(),
        settings.monitoring_config(),
    )
    registry = registry_of(trained_world)
    champion = registry.by_alias("champion")
    assert champion is not None
    loser = max(v.version for v in registry.versions())
    if loser == champion.version:  # runs alone: register one more version
        assert submit_train(trained_world.queue, model, data) is not None
        assert run_worker(trained_world.env, [data.queues.training]).returncode == 0
        loser = max(v.version for v in registry.versions())
    registry.set_alias("challenger", loser)
    now = AcceleratedClock.shared(trained_world.queue, data).now_ms()
    judged_until = now - int(monitoring.windows.label_delay.total_seconds() * 1000)
    since = judged_until - int(monitoring.ab.max_duration.total_seconds() * 1000)
    registry.set_version_tag(loser, CHALLENGER_SINCE_TAG, str(since))
    _fresh_served_log(trained_world)
    write_ab_traffic(
        trained_world, since + MINUTE_MS,
        {("champion", champion.version): (20_000, 0.06), ("challenger", loser): (20_000, 0.06)}, seed=2,
    )  # fmt: skip
    decision = _act_on(trained_world, "monitor-ab-3")["ab"]
    assert decision["decision"] == "rejected"
    assert "max_duration" in decision["why"]
    assert decision["p_value"] > monitoring.ab.alpha
    assert registry.by_alias("challenger") is None
    assert registry.by_alias("champion").version == champion.version  # type: ignore[union-attr]
    assert registry.get(loser).tags[AB_RESULT_TAG] == "lost"
    assert audit.entries(trained_world.queue, 1)[0]["kind"] == "challenger_rejected"


def test_an_alert_schedules_one_retrain_which_starts_once_its_delay_has_passed(
    trained_world: TrainedWorld,
) -> None:
    queue = trained_world.queue
    assert trained_world.settings.monitoring_config().retrain.delay.total_seconds() > 0  # precondition
    firing = {"severity": "alert", "kind": "quality", "what": "ctr_ratio"}
    try:
        queue.set(keys.MONITOR_LATEST, json.dumps({"run_id": "monitor-a", "alerts": [firing]}))
        assert act({}, "monitor-a")["retrain"] == "scheduled"
        pending = json.loads(queue.get(keys.RETRAIN_PENDING) or b"{}")
        assert pending["reason"] == "quality:ctr_ratio"
        assert pending["monitor_run"] == "monitor-a"
        assert audit.entries(queue, 1)[0]["kind"] == "retrain_scheduled"

        queue.set(keys.MONITOR_LATEST, json.dumps({"run_id": "monitor-b", "alerts": [firing]}))
        assert act({}, "monitor-b")["retrain"] == "waiting"  # the delay has not passed; no second one

        queue.set(
            keys.RETRAIN_PENDING, json.dumps({**pending, "due_ms": pending["due_ms"] - 10 * 86_400_000})
        )
        runs = act({}, "monitor-b")["retrain"]
        assert set(runs) == {"dataset", "train", "gate"}
        assert queue.get(keys.RETRAIN_PENDING) is None
        triggered = audit.entries(queue, 1)[0]
        assert triggered["kind"] == "retrain_triggered"
        assert triggered["monitor_run"] == "monitor-a"  # the alert behind it, for tracing
    finally:
        for key in (keys.RETRAIN_PENDING, keys.RETRAIN_COOLDOWN, keys.RETRAIN_ACTIVE, keys.MONITOR_LATEST):
            queue.delete(key)
        _drop_queued_jobs(trained_world)


def _drop_queued_jobs(world: TrainedWorld) -> None:
    """Pipelines a test submitted but did not run: no later test's worker may pick them up."""
    from rq import Queue

    data = world.settings.data_config()
    for name in (data.queues.features, data.queues.training, data.queues.monitoring):
        Queue(name, connection=world.queue).empty()  # type: ignore[no-untyped-call]
    for key in world.queue.scan_iter("fr:pipeline:lock:*"):
        world.queue.delete(key)


def test_a_candidate_left_behind_by_a_gate_that_never_ran_is_cleared_audited_and_retried(
    trained_world: TrainedWorld,
) -> None:
    queue, registry = trained_world.queue, registry_of(trained_world)
    champion = registry.by_alias("champion")
    assert champion is not None
    registry.set_alias(CANDIDATE_ALIAS, champion.version)  # as a crashed retrain would leave it
    try:
        outcome = _act_on(trained_world, "monitor-stale")
        assert outcome["stale_candidate"]["version"] == champion.version
        assert "no gate run" in outcome["stale_candidate"]["why"]
        assert registry.by_alias(CANDIDATE_ALIAS) is None
        assert registry.get(champion.version).tags[GATE_TAG] == "stale"
        cleared = next(e for e in audit.entries(queue, 5) if e["kind"] == "stale_candidate_cleared")
        assert cleared["candidate_version"] == champion.version
        # retried: the retrain is due at once, and this same run submits it
        assert set(outcome["retrain"]) == {"dataset", "train", "gate"}
        assert audit.entries(queue, 1)[0]["kind"] == "retrain_triggered"
    finally:
        registry.remove_alias(CANDIDATE_ALIAS)
        for key in (keys.RETRAIN_PENDING, keys.RETRAIN_ACTIVE, keys.MONITOR_LATEST):
            queue.delete(key)
        _drop_queued_jobs(trained_world)


def test_a_promotion_that_makes_users_worse_off_is_rolled_back_by_the_monitor_with_a_cooldown(
    trained_world: TrainedWorld,
) -> None:
    queue, registry = trained_world.queue, registry_of(trained_world)
    settings = trained_world.settings
    data, model = settings.data_config(), settings.ranking_model_config()
    before = registry.by_alias("champion")
    assert before is not None
    newest = max(v.version for v in registry.versions())
    if newest == before.version:
        assert submit_train(queue, model, data) is not None
        assert run_worker(trained_world.env, [data.queues.training]).returncode == 0
        newest = max(v.version for v in registry.versions())
    registry.promote(newest)
    regression = {
        "severity": "alert", "kind": "promotion_regression", "what": "ctr_ratio", "value": 0.2,
        "reference_ratio": 0.4, "cusum": 13.0,
    }  # fmt: skip
    try:
        queue.set(keys.MONITOR_LATEST, json.dumps({"run_id": "monitor-rb", "alerts": [regression]}))
        outcome = act({}, "monitor-rb")
        assert outcome["rollback"] == {"from_version": newest, "to_version": before.version}
        assert registry.by_alias("champion").version == before.version  # type: ignore[union-attr]
        entry = audit.entries(queue, 1)[0]
        assert (entry["kind"], entry["automatic"], entry["monitor_run"]) == (
            "rolled_back",
            True,
            "monitor-rb",
        )
        assert queue.exists(keys.ROLLBACK_COOLDOWN)
        # within the cooldown, a quality alert starts no retrain
        quality = {"severity": "alert", "kind": "quality", "what": "ctr_ratio"}
        queue.set(keys.MONITOR_LATEST, json.dumps({"run_id": "monitor-rb2", "alerts": [quality]}))
        assert act({}, "monitor-rb2")["retrain"] == "rollback_cooldown"
    finally:
        for key in (keys.ROLLBACK_COOLDOWN, keys.MONITOR_LATEST, keys.RETRAIN_COOLDOWN):
            queue.delete(key)


def test_an_unreachable_registry_fails_the_step_and_changes_nothing(
    trained_world: TrainedWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.registry import RegistryUnavailableError
    from shared.settings import get_settings
    from tests.support import free_port

    queue = trained_world.queue
    quality = {"severity": "alert", "kind": "quality", "what": "ctr_ratio"}
    queue.set(keys.MONITOR_LATEST, json.dumps({"run_id": "monitor-down", "alerts": [quality]}))
    monkeypatch.setenv("FEEDRANK_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    get_settings.cache_clear()
    try:
        with pytest.raises(RegistryUnavailableError):
            act({}, "monitor-down")
        assert queue.get(keys.RETRAIN_PENDING) is None  # no retrain scheduled on a lookup that failed
    finally:
        queue.delete(keys.MONITOR_LATEST)
        get_settings.cache_clear()
    champion = registry_of(trained_world).by_alias("champion")
    assert champion is not None  # the real registry was never touched
