"""The pipeline runner on RQ: steps run in order through real workers, retries with backoff for
transient failures, no retry for permanent ones, a failure cancels what follows, and a pipeline
never runs twice at once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from rq.job import Job

from shared.config import PipelineConfig, RetryConfig, StepConfig
from shared.pipeline import Pipeline, PipelineRunner, Step
from tests.conftest import RedisPair
from tests.support import REPO_ROOT, run_worker

pytestmark = pytest.mark.integration

QUEUE = "test-pipeline"


def config(retries: int = 2) -> PipelineConfig:
    step = StepConfig(timeout=timedelta(seconds=30), retry=RetryConfig(max=retries, backoff=[0]))
    return PipelineConfig(
        steps=dict.fromkeys(("a", "b", "c"), step), schedule_every=None,
        result_ttl=timedelta(hours=1), lock_ttl=timedelta(minutes=10),
    )  # fmt: skip


def pipeline(*funcs: str) -> Pipeline:
    return Pipeline(
        "demo",
        tuple(
            Step(name, f"tests.integration.steps.{f}", QUEUE) for name, f in zip("abc", funcs, strict=False)
        ),
    )


def test_steps_run_in_order_and_the_run_finishes(redis_pair: RedisPair, service_env: dict[str, str]) -> None:
    runner = PipelineRunner(redis_pair.queue, config())
    run_id = runner.submit(pipeline("record", "record", "record"), {"name": "x"})
    assert run_id is not None
    assert runner.run_status(run_id) == "queued"
    assert run_worker(service_env, [QUEUE]).returncode == 0
    view = runner.run(run_id)
    assert view is not None
    assert view.status == "finished"
    assert [s.status for s in view.steps] == ["finished"] * 3
    assert view.steps[0].result == {"name": "x", "seconds": view.steps[0].result["seconds"]}  # type: ignore[index]
    assert redis_pair.queue.lrange(f"test:{run_id}:ran", 0, -1) == [b"x", b"x", b"x"]
    assert runner.active_run("demo") is None


def test_a_second_run_waits_for_the_first(redis_pair: RedisPair, service_env: dict[str, str]) -> None:
    runner = PipelineRunner(redis_pair.queue, config())
    first = runner.submit(pipeline("record"), {"name": "x"})
    assert first is not None
    assert runner.submit(pipeline("record"), {"name": "y"}) is None
    assert runner.active_run("demo") == first
    run_worker(service_env, [QUEUE])
    assert runner.submit(pipeline("record"), {"name": "z"}) is not None


def test_transient_failure_is_retried(redis_pair: RedisPair, service_env: dict[str, str]) -> None:
    runner = PipelineRunner(redis_pair.queue, config(retries=2))
    run_id = runner.submit(pipeline("flaky", "record"), {"name": "after"})
    assert run_id is not None
    run_worker(service_env, [QUEUE])
    view = runner.run(run_id)
    assert view is not None
    assert view.status == "finished"
    assert view.steps[0].result["attempts"] == 2  # type: ignore[index]


def test_permanent_failure_is_not_retried_and_cancels_the_rest(
    redis_pair: RedisPair, service_env: dict[str, str]
) -> None:
    runner = PipelineRunner(redis_pair.queue, config(retries=3))
    run_id = runner.submit(pipeline("record", "broken", "record"), {"name": "x"})
    assert run_id is not None
    run_worker(service_env, [QUEUE])
    view = runner.run(run_id)
    assert view is not None
    assert view.status == "failed"
    assert [s.status for s in view.steps] == ["finished", "failed", "canceled"]
    assert "retrying cannot help" in (view.steps[1].error or "")
    assert redis_pair.queue.get(f"test:{run_id}:attempts") == b"1"
    assert runner.active_run("demo") is None  # the lock is released


def test_exhausted_retries_fail_the_run(redis_pair: RedisPair, service_env: dict[str, str]) -> None:
    runner = PipelineRunner(redis_pair.queue, config(retries=2))
    run_id = runner.submit(pipeline("crashing", "record"), {"name": "x"})
    assert run_id is not None
    run_worker(service_env, [QUEUE])
    assert runner.run_status(run_id) == "failed"
    assert redis_pair.queue.get(f"test:{run_id}:attempts") == b"3"  # first try + 2 retries
    assert Job.fetch(f"{run_id}--a", connection=redis_pair.queue).get_status().value == "failed"


def test_a_stale_lock_is_taken_over(redis_pair: RedisPair) -> None:
    runner = PipelineRunner(redis_pair.queue, config())
    first = runner.submit(pipeline("record"), {"name": "x"})
    assert first is not None
    redis_pair.queue.hset(f"fr:pipeline:run:{first}", "status", "failed")  # its release never happened
    assert runner.submit(pipeline("record"), {"name": "y"}) is not None


def test_cli_lists_runs_with_their_steps(redis_pair: RedisPair, service_env: dict[str, str]) -> None:
    import os

    runner = PipelineRunner(redis_pair.queue, config())
    run_id = runner.submit(pipeline("record", "broken"), {"name": "x"})
    run_worker(service_env, [QUEUE])
    out = subprocess.run(
        [sys.executable, "-m", "services.feature", "pipeline", "runs", "--name", "demo"],
        cwd=REPO_ROOT, env={**os.environ, **service_env}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"{run_id}  failed" in out
    assert "a            finished" in out
    assert "retrying cannot help" in out


def test_a_running_worker_exports_step_metrics(redis_pair: RedisPair, service_env: dict[str, str]) -> None:
    """Steps run in forked children; the worker's parent serves their metrics (multiprocess mode)."""
    import os
    import time

    import httpx

    from tests.support import free_port

    port = free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.feature", "worker", "--queues", QUEUE, "--metrics-port", str(port)],
        cwd=REPO_ROOT, env={**os.environ, **service_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        runner = PipelineRunner(redis_pair.queue, config())
        run_id = runner.submit(pipeline("record", "record"), {"name": "x"})
        assert run_id is not None
        assert runner.wait(run_id, timeout_s=60).status == "finished"
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline and 'step="b"' not in text:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            except httpx.TransportError:
                time.sleep(0.2)
        assert 'feedrank_pipeline_steps_total{outcome="succeeded",pipeline="demo",step="a"} 1.0' in text
        assert 'feedrank_pipeline_step_seconds_count{pipeline="demo",step="b"} 1.0' in text
    finally:
        worker.terminate()
        worker.wait(10)


def test_a_chained_run_waits_for_its_upstream(redis_pair: RedisPair, service_env: dict[str, str]) -> None:
    runner = PipelineRunner(redis_pair.queue, config())
    upstream = runner.submit(pipeline("record", "record"), {"name": "first"})
    assert upstream is not None
    follower_pipeline = Pipeline("later", (Step("a", "tests.integration.steps.record", QUEUE),))
    follower = runner.submit(follower_pipeline, {"name": "second"}, after_run=upstream)
    assert follower is not None
    run_worker(service_env, [QUEUE])
    assert runner.run_status(upstream) == runner.run_status(follower) == "finished"
    first_done = Job.fetch(f"{upstream}--b", connection=redis_pair.queue).ended_at
    second_started = Job.fetch(f"{follower}--a", connection=redis_pair.queue).started_at
    assert first_done is not None
    assert second_started is not None
    assert second_started >= first_done


def test_a_failed_upstream_cancels_the_chained_run(
    redis_pair: RedisPair, service_env: dict[str, str]
) -> None:
    runner = PipelineRunner(redis_pair.queue, config(retries=0))
    upstream = runner.submit(pipeline("broken"), {"name": "x"})
    assert upstream is not None
    follower_pipeline = Pipeline("later", (Step("a", "tests.integration.steps.record", QUEUE),))
    follower = runner.submit(follower_pipeline, {"name": "y"}, after_run=upstream)
    assert follower is not None
    run_worker(service_env, [QUEUE])
    view = runner.run(follower)
    assert view is not None
    assert view.status == "failed"
    assert [s.status for s in view.steps] == ["canceled"]
    assert runner.active_run("later") is None
    assert redis_pair.queue.lrange(f"test:{follower}:ran", 0, -1) == []


def test_a_step_longer_than_the_lock_ttl_keeps_the_lock_until_it_ends(
    redis_pair: RedisPair, service_env: dict[str, str]
) -> None:
    cfg = config().model_copy(update={"lock_ttl": timedelta(seconds=1)})
    runner = PipelineRunner(redis_pair.queue, cfg)
    run_id = runner.submit(pipeline("slow"), {"seconds": 4})
    assert run_id is not None
    worker = threading.Thread(target=run_worker, args=(service_env, [QUEUE]))
    worker.start()
    deadline = time.monotonic() + 30
    while not (runner.run_status(run_id) == "running" and runner.active_run("demo") == run_id):
        assert time.monotonic() < deadline, "the slow step never started"
        time.sleep(0.05)
    first_refusal = time.monotonic()
    while redis_pair.queue.get(f"test:{run_id}:ended") is None and time.monotonic() < deadline:
        assert runner.submit(pipeline("record"), {"name": "intruder"}) is None  # locked: busy
        last_refusal = time.monotonic()
        time.sleep(0.2)
    assert last_refusal - first_refusal > 2.0  # refused for more than twice the lock's 1 s TTL
    worker.join(60)
    view = runner.run(run_id)
    assert view is not None
    assert view.status == "finished"
    assert runner.active_run("demo") is None  # released at the end, not left to expire
