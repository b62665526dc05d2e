"""Fuzzing a running HTTP service: property-based cases from its own OpenAPI schema (schemathesis,
deterministic: hypothesis derandomized), and hand-made hostile bodies.

A finding is a 5xx, an error answer that is not JSON with a `detail`, or no answer in time.
"""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from requests.models import Response
from schemathesis import GenerationMode

ANSWER_TIMEOUT_S = 10.0


@dataclass
class Finding:
    case: str
    status: int
    body: str
    reproduce: str


@dataclass
class FuzzReport:
    requests: int = 0
    findings: list[Finding] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def check(self, case: str, response: Response, reproduce: str) -> None:
        self.requests += 1
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        problem = problem_with(response)
        if problem:
            self.findings.append(
                Finding(case, response.status_code, f"{problem}: {response.text[:200]}", reproduce)
            )


def problem_with(response: Response) -> str | None:
    """What is wrong with an answer, if anything: a 5xx, or an error that is not JSON with a reason."""
    if response.status_code >= 500:
        return "server error"
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            return "error body is not a JSON object"
        if not detail:
            return "error body has no detail"
    return None


def fuzz_service(base_url: str, max_examples: int, headers: dict[str, str] | None = None) -> FuzzReport:
    """Every operation of the service's /openapi.json, with data that fits the schema (positive)
    and data that breaks it (negative)."""
    document: dict[str, Any] = requests.get(f"{base_url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    report = FuzzReport()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]  # our own schemas are valid
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz_operation(operation, mode, base_url, session, report, max_examples, headers or {})
    return report


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    session: requests.Session,
    report: FuzzReport,
    max_examples: int,
    headers: dict[str, str],
) -> None:
    @settings(
        max_examples=max_examples, derandomize=True, database=None, deadline=None,
        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
    )  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=ANSWER_TIMEOUT_S)
        report.check(f"{operation.label} ({mode.value})", response, case.as_curl_command(base_url=base_url))

    with suppress(Unsatisfiable):  # an operation without parameters or body has no negative cases
        run()


# ----------------------------------------------------------------------------- hostile bodies

EVENT = {
    "event_id": "h1-0-c", "event_type": "click", "user_id": 1, "item_id": 2, "request_id": "h1",
    "position": 0, "ts": "2026-01-02T10:00:00Z", "dwell_ms": 5000,
}  # fmt: skip


def hostile_bodies() -> list[tuple[str, bytes, str]]:
    """(name, body, content type): what fuzzers and careless clients send. Every one must get an
    answer below 500, quickly, and an error must say why in JSON."""
    json_type = "application/json"
    deep_array = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"a":' * 5000 + b"1" + b"}" * 5000
    return [
        ("empty", b"", json_type),
        ("not json", b"hello, world", json_type),
        ("truncated", b'{"user_id": 1, "candidates": [1, 2', json_type),
        ("invalid utf-8", b'{"user_id": "\xff\xfe"}', json_type),
        ("invalid utf-8 bytes only", b"\x90\x98\xfc\x1a\x86", json_type),
        (
            "lone surrogate",
            json.dumps([{**EVENT, "event_id": "\ud800x", "request_id": "\udfff"}]).encode(),
            json_type,
        ),
        ("lone surrogate key", json.dumps({"user_id": 1, "\ud800": 1}).encode(), json_type),
        ("NaN and Infinity", b'[{"user_id": NaN, "item_id": Infinity, "position": -Infinity}]', json_type),
        ("NaN in an object", b'{"user_id": NaN, "item_ids": [1], "positions": [NaN]}', json_type),
        ("float overflow", b'{"user_id": 1e400, "item_ids": [1e400]}', json_type),
        (
            "int beyond int64",
            json.dumps({"user_id": 2**64, "item_ids": [2**63], "k": 2**70}).encode(),
            json_type,
        ),
        ("int of 5000 digits", b'{"user_id": ' + b"9" * 5000 + b"}", json_type),
        ("int of 5000 digits in a batch", b'[{"user_id": ' + b"9" * 5000 + b"}]", json_type),
        (
            "huge position",
            json.dumps({"user_id": 1, "item_ids": [1], "positions": [10**400]}).encode(),
            json_type,
        ),
        (
            "events with huge numbers",
            json.dumps([{**EVENT, "ts": 2**62, "dwell_ms": 2**63 - 1, "position": 10**30}]).encode(),
            json_type,
        ),
        ("deeply nested array", deep_array, json_type),
        ("deeply nested object", deep_object, json_type),
        (
            "wrong types",
            b'{"user_id": "alice", "candidates": {"a": 1}, "k": [1], "item_ids": "x"}',
            json_type,
        ),
        ("array instead of object", b"[1, 2, 3]", json_type),
        ("object instead of array", b'{"events": {"event_id": "x"}, "items": 7}', json_type),
        ("scalar", b"42", json_type),
        ("null", b"null", json_type),
        ("duplicate keys", b'{"user_id": 1, "user_id": "two", "k": 3, "k": 4}', json_type),
        ("many keys", json.dumps({f"k{i}": i for i in range(20_000)}).encode(), json_type),
        ("long string", json.dumps([{**EVENT, "event_id": "x" * 2_000_000}]).encode(), json_type),
        (
            "unicode garbage",
            json.dumps(
                [{**EVENT, "event_id": "\u0000\u202e\U0001f4a9", "event_type": "\ufeffclick"}]
            ).encode(),
            json_type,
        ),
        ("wrong content type", json.dumps({"user_id": 1}).encode(), "text/plain"),
        ("form encoded", b"user_id=1&k=3", "application/x-www-form-urlencoded"),
        (
            "multipart garbage",
            b"--x\r\nContent-Disposition: form-data\r\n\r\n1\r\n--x--",
            "multipart/form-data; boundary=x",
        ),
        ("body of 20 MB", b'{"user_id": 1, "candidates": [' + b"1," * 10_000_000 + b"1]}", json_type),
    ]
