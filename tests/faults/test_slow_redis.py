"""A Redis that answers, but slowly (~50 ms per command), or not at all: the ranker answers from
its fallback within its feature-read timeout; ingest either succeeds or says clearly that it
cannot, within its socket timeout, and its liveness never waits for Redis."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from fastapi.testclient import TestClient

from services.ingest.app import create_app as ingest_app
from services.ranker.app import create_app as ranker_app
from shared.settings import REPO_CONFIG_DIR, Settings
from tests.faults.harness import SlowProxy
from tests.faults.test_ingest_durability import events, lake_ids
from tests.support import TrainedWorld, serve_app

COMMAND_DELAY_S = 0.05
PRODUCTION_TIMEOUT = "30ms"  # config/serving.yaml degradation.redis_timeout outside the tiny profile


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


@pytest.fixture
def production_timeouts(tmp_path: Path) -> Path:
    """The repo's config with the ranker's production feature-read timeout in the tiny profile."""
    config_dir = tmp_path / "config"
    shutil.copytree(REPO_CONFIG_DIR, config_dir)
    serving = yaml.safe_load((config_dir / "serving.yaml").read_text())
    serving["profiles"]["tiny"]["degradation"]["redis_timeout"] = PRODUCTION_TIMEOUT
    (config_dir / "serving.yaml").write_text(yaml.safe_dump(serving))
    return config_dir


@pytest.fixture
def slow_store(faults_world: TrainedWorld) -> Iterator[SlowProxy]:
    proxy = SlowProxy(port_of(faults_world.env["FEEDRANK_FEATURE_STORE_URL"]))
    yield proxy
    proxy.close()


def test_the_ranker_falls_back_within_its_timeout_and_recovers(
    faults_world: TrainedWorld, slow_store: SlowProxy, production_timeouts: Path
) -> None:
    store_db = faults_world.env["FEEDRANK_FEATURE_STORE_URL"].rsplit("/", 1)[1]
    settings = faults_world.settings.model_copy(
        update={"config_dir": production_timeouts, "feature_store_url": slow_store.url(int(store_db))}
    )
    timeout_s = settings.serving_config().degradation.redis_timeout.total_seconds()
    with TestClient(ranker_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").json().get("status") != "ready":
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.1)
        assert not client.post("/rank", json={"user_id": 3, "k": 5}).json()["degraded"]

        slow_store.delay_s = COMMAND_DELAY_S
        latencies: list[float] = []
        answers: Counter[tuple[int, str | None]] = Counter()
        for user in range(40):
            started = time.perf_counter()
            response = client.post("/rank", json={"user_id": user, "k": 5})
            latencies.append(time.perf_counter() - started)
            body = response.json()
            answers[(response.status_code, body.get("reason"))] += 1
        ready = client.get("/readyz").json()

        slow_store.delay_s = 0.0
        restored = time.monotonic()
        while client.post("/rank", json={"user_id": 3, "k": 5}).json()["degraded"]:
            assert time.monotonic() - restored < 15, "no recovery after the store got fast again"
            time.sleep(0.05)
        recovered_s = time.monotonic() - restored
    print(
        f"FAULT slow_feature_store delay_ms={COMMAND_DELAY_S * 1000:.0f} requests=40 errors_5xx=0 "
        f"answers={dict(answers)} max_latency_ms={max(latencies) * 1000:.0f} lost=0 recovery_s={recovered_s:.2f}"
    )
    assert answers == {(200, "redis_unavailable"): 40}  # every answer, from the fallback
    # a request waits for at most two feature reads (user, then candidates) before it falls back;
    # once the breaker is open, none
    assert max(latencies) < 2 * timeout_s + 0.5
    assert sorted(latencies)[20] < timeout_s
    assert ready["status"] == "degraded"


def ingest_settings(
    tmp_path: Path, queue: SlowProxy, store: SlowProxy, queue_db: int, store_db: int
) -> Settings:
    return Settings(
        queue_url=queue.url(queue_db), feature_store_url=store.url(store_db), lake_path=tmp_path / "lake",
        profile="tiny", log_format="console", log_level="WARNING",
    )  # fmt: skip


def test_ingest_with_a_slow_and_then_a_stalled_redis(tmp_path: Path, redis_pair: object) -> None:
    queue_url, store_url = redis_pair.queue_url, redis_pair.store_url  # type: ignore[attr-defined]
    queue = SlowProxy(port_of(queue_url), COMMAND_DELAY_S)
    store = SlowProxy(port_of(store_url), COMMAND_DELAY_S)
    settings = ingest_settings(
        tmp_path, queue, store, int(queue_url.rsplit("/", 1)[1]), int(store_url.rsplit("/", 1)[1])
    )
    socket_timeout_s = settings.data_config().redis.socket_timeout.total_seconds()
    try:
        with serve_app(ingest_app(settings)) as url:
            started = time.monotonic()
            slow = requests.post(f"{url}/events", json=events(0, 50), timeout=30)
            slow_s = time.monotonic() - started
            assert slow.status_code == 200, slow.text
            assert slow.json()["stored"] == 50

            queue.stall()
            store.stall()
            outcome: list[requests.Response] = []
            sender = threading.Thread(
                target=lambda: outcome.append(requests.post(f"{url}/events", json=events(50, 50), timeout=60))
            )
            started = time.monotonic()
            sender.start()
            time.sleep(0.3)
            probe = time.monotonic()
            live = requests.get(f"{url}/healthz", timeout=2)
            liveness_s = time.monotonic() - probe
            sender.join(60)
            stalled_s = time.monotonic() - started
            queue.resume()
            store.resume()
            (stalled,) = outcome
            retried = requests.post(f"{url}/events", json=events(50, 50), timeout=30)
    finally:
        queue.close()
        store.close()
    print(
        f"FAULT slow_then_stalled_redis_ingest slow_post_s={slow_s:.2f} stalled_answer={stalled.status_code} "
        f"stalled_answer_s={stalled_s:.1f} healthz_during_stall_ms={liveness_s * 1000:.0f} "
        f"retry={retried.status_code} lost=0"
    )
    assert live.status_code == 200
    assert liveness_s < 1.0  # liveness does not wait for Redis
    assert stalled.status_code == 503
    assert stalled.headers["retry-after"] == "1"
    assert "nothing of the batch was acknowledged" in stalled.json()["detail"]
    assert stalled_s < 3 * socket_timeout_s + 2  # a few commands may each wait their socket timeout
    assert retried.status_code == 200
    assert sorted(lake_ids(tmp_path / "lake")) == sorted(f"e{i}" for i in range(100))
