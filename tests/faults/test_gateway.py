"""Serving stays up: the feature store stops behind the real gateway (HAProxy with the health
checks of services/gateway/haproxy.cfg) and two ranker processes. Replicas stay in rotation and
answer from the fallback, no request gets a 5xx, and features come back without a restart."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shared.config import load_serving_config
from shared.settings import REPO_CONFIG_DIR
from tests.faults.harness import GATEWAY_CFG, OPERATOR, Gateway, Service, gateway_config, stoppable_copy
from tests.support import StoppableRedis, TrainedWorld, free_port

SERVING = load_serving_config(REPO_CONFIG_DIR, "tiny")
HEALTH_CHECK_S = 2 * 2  # haproxy.cfg: inter 2s, fall 2: a failing replica leaves rotation after ~4 s


def test_the_generated_gateway_config_keeps_the_health_checks_and_limits() -> None:
    shipped = GATEWAY_CFG.read_text()
    local = gateway_config([8101, 8102], 9000, 9001)
    for line in (
        "option httpchk GET /readyz",
        "http-check expect status 200",
        "default-server inter 2s fall 2 rise 1 check",
        f"req.hdr_val(content-length) gt {SERVING.api.max_body_bytes}",
        "timeout http-request 10s",
        'if { sc_http_req_rate(0) gt "${RANK_RATE_LIMIT}" }',
        'stats auth "${UI_USER}:${UI_PASSWORD}"',
    ):
        assert line in shipped, line
        assert line in local, line
    assert "server ranker1 127.0.0.1:8101" in local


@pytest.fixture
def rankers(faults_world: TrainedWorld, tmp_path: Path) -> Iterator[tuple[list[Service], StoppableRedis]]:
    if not shutil.which("haproxy"):
        pytest.fail(
            "haproxy is not installed (apt-get install -y haproxy): the gateway test needs it", pytrace=False
        )
    with stoppable_copy(faults_world.store) as store:
        env = {k: v for k, v in faults_world.env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env["FEEDRANK_FEATURE_STORE_URL"] = f"{store.url}/0"
        replicas = []
        for i in range(2):
            port = free_port()
            replica_env = {**env, "FEEDRANK_MODEL_CACHE_DIR": str(tmp_path / f"model-cache-{i}")}
            replicas.append(
                Service(
                    "services.ranker",
                    ["serve", "--port", str(port)],
                    replica_env,
                    tmp_path / f"ranker-{i}.log",
                    port,
                )
            )
        try:
            for replica in replicas:
                replica.start(wait_path=None)
            for replica in replicas:
                replica.wait("/readyz", 120)
                deadline = time.monotonic() + 60
                while requests.get(f"{replica.url}/readyz", timeout=5).json()["status"] != "ready":
                    assert time.monotonic() < deadline, replica.tail()
                    time.sleep(0.2)
            yield replicas, store
        finally:
            for replica in replicas:
                replica.stop()


def send(session: requests.Session, url: str, user: int) -> tuple[int, bool | None]:
    response = session.post(f"{url}/rank", json={"user_id": user, "k": 5}, timeout=10)
    degraded = response.json().get("degraded") if response.status_code == 200 else None
    return response.status_code, degraded


def test_feature_store_down_behind_the_gateway(
    rankers: tuple[list[Service], StoppableRedis], tmp_path: Path
) -> None:
    replicas, store = rankers
    gateway = Gateway([r.port for r in replicas], tmp_path).start()
    try:
        deadline = time.monotonic() + 20
        while set(gateway.servers().values()) != {"UP"}:
            assert time.monotonic() < deadline, gateway.servers()
            time.sleep(0.2)
        with requests.Session() as session:
            healthy = Counter(send(session, gateway.url, u) for u in range(40))
            assert healthy == {(200, False): 40}

            store.stop()
            outage: Counter[tuple[int, bool | None]] = Counter()
            started = time.monotonic()
            user = 0
            while time.monotonic() - started < 2 * HEALTH_CHECK_S:
                outage[send(session, gateway.url, user)] += 1
                user += 1
            in_rotation = gateway.servers()

            restarted = time.monotonic()
            store.start()
            streak = 0
            recovery: Counter[tuple[int, bool | None]] = Counter()
            while streak < 20:
                answer = send(session, gateway.url, user)
                recovery[answer] += 1
                streak = streak + 1 if answer == (200, False) else 0
                user += 1
                assert time.monotonic() - restarted < 30, f"no recovery: {recovery}"
            recovered_s = time.monotonic() - restarted

            too_big = session.post(f"{gateway.url}/rank", data=b"[" + b"1," * 40_000 + b"1]",
                                   headers={"content-type": "application/json"}, timeout=10)  # fmt: skip
        errors = sum(n for (code, _), n in outage.items() if code >= 500) + sum(
            n for (code, _), n in recovery.items() if code >= 500
        )
        requests_sent = sum(outage.values())
        print(
            f"FAULT feature_store_down_behind_gateway requests={requests_sent} errors_5xx={errors} "
            f"degraded={outage[(200, True)]} lost=0 recovery_s={recovered_s:.2f} servers={in_rotation}"
        )
        assert errors == 0, (outage, recovery)
        assert outage[(200, True)] == requests_sent  # every answer came from the fallback, said so
        assert set(in_rotation.values()) == {"UP"}  # degraded replicas stayed in rotation
        assert recovered_s < 15  # the breaker lets a request through every breaker_cooldown
        assert too_big.status_code == 413
        assert too_big.headers["content-type"] == "application/json"

        for replica in replicas:
            replica.kill()
        nobody = requests.post(f"{gateway.url}/rank", json={"user_id": 1}, timeout=30)
        assert nobody.status_code == 503
        assert "no ranker replica" in nobody.json()["detail"]
    finally:
        gateway.stop()


def test_one_client_above_the_rate_limit_gets_429_and_others_are_served(
    rankers: tuple[list[Service], StoppableRedis], tmp_path: Path
) -> None:
    replicas, _ = rankers
    limit = 5  # far below what one sequential client sends (each answer takes milliseconds)
    gateway = Gateway([r.port for r in replicas], tmp_path, rate_limit=limit).start()
    try:
        deadline = time.monotonic() + 20
        while set(gateway.servers().values()) != {"UP"}:
            assert time.monotonic() < deadline, gateway.servers()
            time.sleep(0.2)
        burst: Counter[int] = Counter()
        with requests.Session() as session:
            started = time.monotonic()
            for user in range(60):  # every request counts, refused ones too: the rate stays above
                burst[send(session, gateway.url, user)[0]] += 1
            burst_s = time.monotonic() - started
            refused = session.post(f"{gateway.url}/rank", json={"user_id": 1, "k": 5}, timeout=10)
        # Another client (another source address on the loopback network) is not limited.
        other = requests.Session()
        other.mount("http://", _SourceAddressAdapter("127.0.0.2"))
        with other:
            neighbour = send(other, gateway.url, 7)
        stats_open = requests.get(f"http://127.0.0.1:{gateway.admin_port}/stats", timeout=5)
        stats_auth = requests.get(f"http://127.0.0.1:{gateway.admin_port}/stats", auth=OPERATOR, timeout=5)
        print(
            f"FAULT rank_rate_limit limit={limit}/s burst=60 in {burst_s:.2f}s "
            f"answers={dict(burst)} neighbour={neighbour[0]}"
        )
        assert limit <= burst[200] <= 2 * limit  # the first ones pass ...
        assert burst[429] == 60 - burst[200]  # ... the rest are refused, nothing else, never a 5xx
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/json"
        assert "rate limit" in refused.json()["detail"]
        assert neighbour == (200, False)
        assert stats_open.status_code == 401  # the stats page needs the operators' password
        assert stats_auth.status_code == 200
    finally:
        gateway.stop()


class _SourceAddressAdapter(requests.adapters.HTTPAdapter):
    """Connections from a given local address: a second client on the same machine."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]
