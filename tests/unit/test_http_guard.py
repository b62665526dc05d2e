"""Request bodies are bounded in size and time before a handler runs, and error bodies always
encode, whatever the client sent."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.ranker.app import readiness
from shared.http_guard import BodyRejectedError, ClientGoneError, json_bytes, read_body, validation_problems


def receiver(*messages: dict[str, Any], then_wait: bool = False) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if then_wait:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    return receive


def chunk(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


def test_a_body_in_pieces_is_joined() -> None:
    body = asyncio.run(read_body(receiver(chunk(b'{"a"', True), chunk(b": 1}", False)), 100, 1.0))
    assert body == b'{"a": 1}'


def test_a_body_over_the_limit_is_a_413_as_soon_as_it_passes_it() -> None:
    pieces = [chunk(b"x" * 60, True), chunk(b"x" * 60, True), chunk(b"never read", False)]
    with pytest.raises(BodyRejectedError) as caught:
        asyncio.run(read_body(receiver(*pieces), 100, 1.0))
    assert caught.value.status == 413


@pytest.mark.parametrize("untimed_first", [False, True])
def test_a_body_that_stops_arriving_is_a_408(untimed_first: bool) -> None:
    with pytest.raises(BodyRejectedError) as caught:
        asyncio.run(read_body(receiver(chunk(b"{", True), then_wait=True), 100, 0.05, untimed_first))
    assert caught.value.status == 408


def test_a_body_in_one_piece_needs_no_timer() -> None:
    assert asyncio.run(read_body(receiver(chunk(b"{}", False)), 100, 0.05, untimed_first=True)) == b"{}"


def test_a_client_that_leaves_mid_body_is_noticed() -> None:
    with pytest.raises(ClientGoneError):
        asyncio.run(read_body(receiver(chunk(b"{", True)), 100, 1.0))


def test_validation_problems_do_not_echo_the_input() -> None:
    errors = [{"type": "int_parsing", "loc": ("body", "user_id"), "msg": "Input should be a valid integer",
               "input": b"\xff\xfe", "ctx": {"error": ValueError("x")}}]  # fmt: skip
    problems = validation_problems(errors)
    assert problems == [
        {"type": "int_parsing", "loc": ["body", "user_id"], "msg": "Input should be a valid integer"}
    ]
    assert json.loads(json_bytes({"detail": problems}))


def test_json_bytes_encodes_what_json_cannot() -> None:
    text = json_bytes({"detail": "\ud800 lone surrogate", "raw": b"\xff", "when": object})
    assert json.loads(text)["detail"] == "\ud800 lone surrogate"


@pytest.mark.parametrize(
    ("models", "checked", "fallback_items", "store_problem", "ready", "status"),
    [
        ({"champion": 1}, True, 10, None, True, "ready"),
        ({"champion": 1}, True, 0, "Timeout", True, "degraded"),  # the model answers, from the fallback
        ({}, True, 10, None, True, "degraded"),  # no model: the popularity fallback answers
        ({}, True, 10, "Timeout", True, "degraded"),
        ({}, False, 10, None, False, "not_ready"),  # the first registry check is still running
        ({}, True, 0, None, False, "not_ready"),  # nothing to answer with
    ],
)
def test_ready_means_it_can_answer(
    models: dict[str, int],
    checked: bool,
    fallback_items: int,
    store_problem: str | None,
    ready: bool,
    status: str,
) -> None:
    is_ready, body = readiness(models, checked, fallback_items, store_problem)
    assert (is_ready, body["status"]) == (ready, status)
    assert bool(body["problems"]) == (status != "ready")
