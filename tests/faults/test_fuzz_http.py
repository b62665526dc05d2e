"""Fuzzing every HTTP endpoint of ranker, ingest and monitor: no 5xx, errors are JSON with a reason.

Property-based cases come from each service's own OpenAPI schema (schemathesis, derandomized: the
same cases on every run), both schema-conforming and schema-breaking; the hand-made hostile bodies
cover what a schema cannot express (bytes that are not UTF-8, NaN, nesting, sizes, content types).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import requests

from services.ingest.app import create_app as ingest_app
from services.monitor.app import create_app as monitor_app
from services.ranker.app import create_app as ranker_app
from shared.config import load_data_config, load_serving_config
from shared.settings import REPO_CONFIG_DIR
from tests.faults.fuzzing import ANSWER_TIMEOUT_S, FuzzReport, fuzz_service, hostile_bodies, problem_with
from tests.support import TrainedWorld, serve_app

EXAMPLES = 80
"""Cases per operation and mode (schema-conforming, schema-breaking): ~2,000 requests, ~20 s here."""

DATA = load_data_config(REPO_CONFIG_DIR, "tiny")
SERVING = load_serving_config(REPO_CONFIG_DIR, "tiny")


@pytest.fixture(scope="module")
def ranker_url(faults_world: TrainedWorld) -> Iterator[str]:
    with serve_app(ranker_app(faults_world.settings)) as url:
        deadline = time.monotonic() + 30
        while requests.get(f"{url}/readyz", timeout=5).json().get("status") != "ready":
            assert time.monotonic() < deadline, "the ranker did not get ready"
            time.sleep(0.1)
        yield url


@pytest.fixture(scope="module")
def ingest_url(faults_world: TrainedWorld) -> Iterator[str]:
    with serve_app(ingest_app(faults_world.settings)) as url:
        yield url


@pytest.fixture(scope="module")
def monitor_url(faults_world: TrainedWorld) -> Iterator[str]:
    with serve_app(monitor_app(faults_world.settings)) as url:
        yield url


def assert_clean(report: FuzzReport) -> None:
    listing = "\n".join(
        f"{f.case} -> {f.status} {f.body}\n    {f.reproduce[:300]}" for f in report.findings[:20]
    )
    assert not report.findings, f"{len(report.findings)} of {report.requests} requests went wrong:\n{listing}"


def test_ranker_from_its_schema(ranker_url: str) -> None:
    report = fuzz_service(ranker_url, EXAMPLES)
    assert_clean(report)
    assert report.statuses.get(200, 0) > 50  # the fuzzer also got through to real rankings
    assert report.statuses.get(422, 0) > 50  # and broke the schema


def test_ingest_from_its_schema(ingest_url: str) -> None:
    report = fuzz_service(ingest_url, EXAMPLES)
    assert_clean(report)
    assert report.statuses.get(200, 0) > 20
    assert report.statuses.get(422, 0) > 20


def test_monitor_from_its_schema(monitor_url: str) -> None:
    report = fuzz_service(monitor_url, EXAMPLES)
    assert_clean(report)
    assert report.statuses.get(200, 0) > 5


BODY_TARGETS = [("ranker", "/rank"), ("ranker", "/predict"), ("ingest", "/events"), ("ingest", "/items"),
                ("monitor", "/report")]  # fmt: skip


@pytest.mark.parametrize(("service", "path"), BODY_TARGETS)
def test_hostile_bodies(service: str, path: str, ranker_url: str, ingest_url: str, monitor_url: str) -> None:
    base = {"ranker": ranker_url, "ingest": ingest_url, "monitor": monitor_url}[service]
    report = FuzzReport()
    slow = []
    with requests.Session() as session:
        for name, body, content_type in hostile_bodies():
            started = time.monotonic()
            response = session.post(
                f"{base}{path}", data=body, headers={"content-type": content_type}, timeout=ANSWER_TIMEOUT_S
            )
            if time.monotonic() - started > 5:
                slow.append(name)
            report.check(name, response, f"{name} ({len(body)} bytes, {content_type})")
    assert_clean(report)
    assert not slow, f"answered only after more than 5 s: {slow}"
    assert set(report.statuses) <= {200, 400, 405, 413, 422}, report.statuses


@pytest.mark.parametrize(("service", "limit"), [("ranker", SERVING.api.max_body_bytes), ("ingest", DATA.ingest.max_body_bytes), ("monitor", DATA.http.max_body_bytes)])  # fmt: skip
def test_a_declared_oversized_body_is_refused_before_it_is_sent(
    service: str, limit: int, ranker_url: str, ingest_url: str, monitor_url: str
) -> None:
    """413 on the Content-Length alone: the server reads none of the body."""
    base = {"ranker": ranker_url, "ingest": ingest_url, "monitor": monitor_url}[service]
    path = {"ranker": "/rank", "ingest": "/events", "monitor": "/report"}[service]
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=ANSWER_TIMEOUT_S) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n".encode()
        )
        answer = conn.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert '"detail"' in answer


@pytest.mark.parametrize("service", ["ranker", "ingest"])
def test_a_body_that_never_finishes_is_a_408(service: str, ranker_url: str, ingest_url: str) -> None:
    """A client that stops sending mid-body holds no worker for longer than http.body_timeout."""
    base = {"ranker": ranker_url, "ingest": ingest_url}[service]
    path = {"ranker": "/rank", "ingest": "/events"}[service]
    host, port = base.removeprefix("http://").split(":")
    timeout_s = DATA.http.body_timeout.total_seconds()
    with socket.create_connection((host, int(port)), timeout=timeout_s + ANSWER_TIMEOUT_S) as conn:
        started = time.monotonic()
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"user_id": '.encode()
        )
        answer = conn.recv(4096).decode()
        waited = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 408"), answer
    assert timeout_s <= waited < timeout_s + 5


def test_every_error_of_the_ranker_fast_path_is_json(ranker_url: str) -> None:
    """The /rank fast path skips the framework: its 422 must still be JSON that encodes, whatever
    the input (the input is not echoed)."""
    response = requests.post(f"{ranker_url}/rank", data=b"\xff\xfe{", timeout=ANSWER_TIMEOUT_S)
    assert response.status_code == 422
    assert problem_with(response) is None
    assert "input" not in response.json()["detail"][0]
