"""The monitor against a trained tiny world: a real RQ worker, a real MLflow store, the real lake.

The full drift -> retrain -> gate -> A/B -> promotion loop runs in test_scenario.py; here each
decision is pinned down on its own, with data built so that the right answer is known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
import numpy as np
import pyarrow as pa
import pytest

from services.monitor import alerts, audit
from services.monitor.app import create_app
from services.monitor.jobs import CHALLENGER_SINCE, act, decide_ab
from shared import keys
from shared.clock import AcceleratedClock
from shared.connections import lake
from shared.dags import submit_monitor, submit_train
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
) -> None:
    """Served slots (the ranker's log) and their clicks: per (variant, version), N slots at a CTR."""
    rng = np.random.default_rng(seed)
    served: list[pa.Table] = []
    clicks: list[pa.Table] = []
    for (variant, version), (impressions, ctr) in arms.items():
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
                    "user_id": np.repeat(rng.integers(0, 100, len(requests)), slots),
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

    the_lake = lake(settings)
    now = AcceleratedClock.shared(trained_world.queue, data).now_ms()
    judged_until = now - int(monitoring.windows.label_delay.total_seconds() * 1000)
    since = judged_until - 60 * MINUTE_MS
    registry.client.set_model_version_tag(
        registry.name, str(challenger.version), CHALLENGER_SINCE, str(since)
    )
    few = monitoring.ab.min_impressions // 2
    write_ab_traffic(
        trained_world,
        since + MINUTE_MS,
        {("champion", champion.version): (few, 0.05), ("challenger", challenger.version): (few, 0.10)},
    )
    decision = decide_ab(trained_world.queue, the_lake, registry, model, monitoring, challenger, data)
    assert decision["decision"] == "collecting"  # below the minimum sample, even with a big lift
    assert registry.by_alias("champion").version == champion.version  # type: ignore[union-attr]

    enough = monitoring.ab.min_impressions * 2
    write_ab_traffic(
        trained_world,
        since + 2 * MINUTE_MS,
        {("champion", champion.version): (enough, 0.05), ("challenger", challenger.version): (enough, 0.10)},
        seed=1,
    )
    decision = decide_ab(trained_world.queue, the_lake, registry, model, monitoring, challenger, data)
    assert decision["decision"] == "promoted"
    assert decision["p_value"] < monitoring.ab.alpha
    assert decision["challenger_ctr"] > decision["champion_ctr"]
    assert registry.by_alias("champion").version == challenger.version  # type: ignore[union-attr]
    assert registry.by_alias("challenger") is None

    promoted = audit.entries(trained_world.queue, 5)[0]
    assert promoted["kind"] == "promoted"
    assert promoted["challenger_impressions"] >= enough
    shown = monitor_cli(trained_world, "audit", "--limit", "1")
    assert json.loads(shown.stdout.splitlines()[0])["kind"] == "promoted"

    rolled = monitor_cli(trained_world, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert f"from version {challenger.version} to version {champion.version}" in rolled.stdout
    assert registry.by_alias("champion").version == champion.version  # type: ignore[union-attr]
    assert audit.entries(trained_world.queue, 1)[0]["kind"] == "rolled_back"


def test_ab_test_rejects_a_challenger_that_never_wins(trained_world: TrainedWorld) -> None:
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
    since = judged_until - 30 * MINUTE_MS
    registry.client.set_model_version_tag(registry.name, str(loser), CHALLENGER_SINCE, str(since))
    most = monitoring.ab.max_impressions
    write_ab_traffic(
        trained_world,
        since + MINUTE_MS,
        {("champion", champion.version): (most, 0.06), ("challenger", loser): (most, 0.06)},
        seed=2,
    )
    challenger = registry.by_alias("challenger")
    assert challenger is not None
    decision = decide_ab(trained_world.queue, lake(settings), registry, model, monitoring, challenger, data)
    assert decision["decision"] == "rejected"
    assert decision["p_value"] >= monitoring.ab.alpha
    assert registry.by_alias("challenger") is None
    assert registry.by_alias("champion").version == champion.version  # type: ignore[union-attr]
    assert registry.get(loser).tags["feedrank.ab_result"] == "lost"
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
        for key in (keys.RETRAIN_PENDING, keys.RETRAIN_COOLDOWN, keys.MONITOR_LATEST):
            queue.delete(key)
