"""Pipeline steps for the runner's tests, referenced by dotted path like real ones."""

from __future__ import annotations

import os
import time
from typing import Any

from redis import Redis

from shared.pipeline import PermanentStepError


def _redis() -> Redis:
    return Redis.from_url(os.environ["FEEDRANK_QUEUE_URL"])


def record(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Appends its name to a list, so tests can see the order steps ran in."""
    _redis().rpush(f"test:{run_id}:ran", params["name"])
    return {"name": params["name"]}


def flaky(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Fails on its first attempt, succeeds on the next (a transient failure)."""
    attempts = _redis().incr(f"test:{run_id}:attempts")
    if attempts < 2:
        raise ConnectionError("transient")
    return {"attempts": attempts}


def broken(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    _redis().incr(f"test:{run_id}:attempts")
    raise PermanentStepError("bad input: retrying cannot help")


def crashing(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    _redis().incr(f"test:{run_id}:attempts")
    raise RuntimeError("always fails")


def slow(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Works longer than the pipeline lock's TTL, then says it is done."""
    time.sleep(params["seconds"])
    _redis().set(f"test:{run_id}:ended", 1)
    return {"slept": params["seconds"]}
