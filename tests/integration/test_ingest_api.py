"""ingest over HTTP: clear 4xx for what is not a batch, partial acceptance for mixed batches, and a
burst of garbage that neither crashes the service nor loses the good events sent alongside it."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.ingest.app import create_app
from shared.connections import lake
from shared.settings import Settings
from tests.conftest import RedisPair

pytestmark = pytest.mark.integration
FOREVER_MS = 4_102_444_800_000  # 2100-01-01


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def event(i: int, **changes: Any) -> dict[str, Any]:
    base = {
        "event_id": f"q{i}-1-c", "event_type": "click", "user_id": 3, "item_id": 4, "request_id": f"q{i}",
        "position": 1, "ts": "2026-01-02T10:00:00Z", "dwell_ms": 5000,
    }  # fmt: skip
    return base | changes


def metric(client: TestClient, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{wanted}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_good_batch_is_stored(client: TestClient, settings: Settings) -> None:
    response = client.post("/events", json=[event(i) for i in range(3)])
    assert response.status_code == 200
    assert response.json()["stored"] == 3
    assert lake(settings).read_events(0, FOREVER_MS).num_rows == 3


def test_wrapped_batch_is_accepted(client: TestClient) -> None:
    assert client.post("/events", json={"events": [event(1)]}).json()["stored"] == 1


def test_mixed_batch_stores_the_good_and_reports_the_bad(client: TestClient) -> None:
    response = client.post(
        "/events", json=[event(1), event(2, position="top"), event(3, event_type="share", dwell_ms=None)]
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["stored"], body["quarantined"]) == (1, 2)
    assert body["rule_failures"] == {"type:position": 1, "position_range": 1, "event_type_known": 1}


def test_all_bad_batch_is_422_with_the_report(client: TestClient) -> None:
    response = client.post("/events", json=[event(1, user_id="x")])
    assert response.status_code == 422
    assert response.json()["quarantined"] == 1


def test_invalid_json_is_400_and_the_body_is_kept(client: TestClient, settings: Settings) -> None:
    response = client.post(
        "/events", content=b'[{"event_id": "a",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]
    kept = lake(settings).read_quarantine("body").to_pylist()
    assert kept[0]["raw"] == '[{"event_id": "a",'
    assert kept[0]["reasons"] == "events:invalid_json"


def test_not_a_batch_is_422(client: TestClient) -> None:
    response = client.post("/events", json={"event": event(1)})
    assert response.status_code == 422
    assert "expected a JSON array" in response.json()["detail"]


def test_empty_batch_is_422(client: TestClient) -> None:
    assert client.post("/events", json=[]).status_code == 422


def test_too_many_records_is_413(client: TestClient, settings: Settings) -> None:
    limit = settings.data_config().ingest.max_batch_events
    response = client.post("/events", json=[event(i) for i in range(limit + 1)])
    assert response.status_code == 413
    assert "max_batch_events" in response.json()["detail"]


def test_too_many_bytes_is_413(client: TestClient, settings: Settings) -> None:
    limit = settings.data_config().ingest.max_body_bytes
    response = client.post("/events", content=b"[" + b" " * limit + b"]")
    assert response.status_code == 413


def test_bad_idempotency_key_is_400(client: TestClient) -> None:
    response = client.post("/events", json=[event(1)], headers={"Idempotency-Key": "../etc/passwd"})
    assert response.status_code == 400


def test_resend_with_same_key_stores_nothing_twice(client: TestClient, settings: Settings) -> None:
    for _ in range(2):
        assert (
            client.post("/events", json=[event(1), event(2)], headers={"Idempotency-Key": "k1"}).status_code
            == 200
        )
    assert lake(settings).read_events(0, FOREVER_MS).num_rows == 2


def test_garbage_burst_loses_no_good_event(
    client: TestClient, settings: Settings, redis_pair: RedisPair
) -> None:
    rng = random.Random(4)
    junk = [
        b"",
        b"null",
        b"{",
        b"\xff\xfe",
        b"[1,2,3]",
        b'{"events": 5}',
        b'"string"',
        b"[" + b"{}," * 50 + b"{}]",
    ]
    good = 0
    for round_ in range(60):
        body = rng.choice(junk)
        client.post("/events", content=body, headers={"content-type": "application/json"})
        batch = [event(round_ * 10 + i) for i in range(3)] + [event(9000 + round_, ts="not a time"), 17]
        response = client.post("/events", content=json.dumps(batch))
        assert response.status_code == 200
        good += 3
    assert client.get("/healthz").status_code == 200
    assert lake(settings).read_events(0, FOREVER_MS).num_rows == good
    received = metric(client, "feedrank_ingest_records_total", kind="events", outcome="received")
    parts = sum(
        metric(client, "feedrank_ingest_records_total", kind="events", outcome=o)
        for o in ("stored", "quarantined", "duplicate")
    )
    assert received == parts > 0


def test_readiness_checks_dependencies(client: TestClient) -> None:
    assert client.get("/readyz").json() == {"status": "ready"}


def test_recent_reports_are_listed(client: TestClient) -> None:
    client.post("/events", json=[event(1)], headers={"Idempotency-Key": "rep-1"})
    reports = client.get("/reports", params={"limit": 5}).json()
    assert reports[0]["batch_id"] == "rep-1"
