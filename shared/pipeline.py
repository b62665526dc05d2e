"""Pipelines as RQ job chains: the seed's Airflow DAG ideas (steps, dependencies, retries, runs) on Redis.

A pipeline is an ordered list of steps; each step is a function referenced by dotted path and run
by whichever worker listens on the step's queue (services never import each other). Submitting
a pipeline creates a *run*: an id, a record in Redis, and one RQ job per step chained with
`depends_on`. Steps get retries with backoff and a timeout from config.

A pipeline never runs twice at once: a run takes the pipeline's lock (SET NX with a TTL) and the
last step's success, or any step's final failure, releases it. While a step runs, its worker
renews the lock every third of its TTL, so a step longer than the TTL (a long training) keeps it;
a run whose worker died stops renewing, and its lock expires. A lock whose run is already over
(a crashed worker, an expired callback) is taken over rather than blocking forever.

Step functions have the signature `step(params: dict, run_id: str) -> dict`; the returned summary
is stored in the run record. Raise `PermanentStepError` for a failure a retry cannot fix.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import Counter, Gauge, Histogram
from redis import Redis
from rq import Callback, Queue, Retry, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from shared import keys
from shared.config import PipelineConfig
from shared.metrics import JOB_BUCKETS

log = structlog.get_logger(__name__)

STEP_SECONDS = Histogram(
    "feedrank_pipeline_step_seconds", "Duration of pipeline steps.", ["pipeline", "step"], buckets=JOB_BUCKETS
)
STEP_OUTCOMES = Counter(
    "feedrank_pipeline_steps_total", "Pipeline step executions by outcome.", ["pipeline", "step", "outcome"]
)
LAST_SUCCESS = Gauge(
    "feedrank_pipeline_last_success_timestamp_seconds",
    "Wall time of the last successful run of each pipeline.",
    ["pipeline"],
    multiprocess_mode="max",
)

RUN_QUEUED, RUN_RUNNING, RUN_FINISHED, RUN_FAILED = "queued", "running", "finished", "failed"
TERMINAL = {RUN_FINISHED, RUN_FAILED}

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder then return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 1 or 0 end
return 0
"""


class PermanentStepError(RuntimeError):
    """Bad input or a failed check: retrying would fail the same way, so the step fails at once."""


@dataclass(frozen=True)
class Step:
    name: str
    func: str  # dotted path, resolved by the worker that runs it
    queue: str


@dataclass(frozen=True)
class Pipeline:
    name: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class StepView:
    name: str
    job_id: str
    status: str
    started_at: str | None
    ended_at: str | None
    result: dict[str, Any] | None
    error: str | None


@dataclass(frozen=True)
class RunView:
    run_id: str
    pipeline: str
    status: str
    created_at: str
    params: dict[str, Any]
    steps: list[StepView]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _decode(mapping: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in mapping.items()}


def _exception_line(traceback_text: str) -> str:
    """The 'SomeError: message' line of a traceback (messages may span lines: keep the first few)."""
    lines = traceback_text.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if (
            lines[i]
            and not lines[i].startswith((" ", "\t"))
            and ":" in lines[i]
            and not lines[i].startswith("Traceback")
        ):
            return " ".join(line.strip() for line in lines[i : i + 4])[:500]
    return lines[-1] if lines else ""


class PipelineRunner:
    """Submits runs and reads their state. `conn` is the queue Redis."""

    def __init__(self, conn: Redis, config: PipelineConfig) -> None:
        self.conn = conn
        self.config = config
        self._release = conn.register_script(_RELEASE)

    def _retry(self, step: str) -> Retry | None:
        retry = self.config.steps[step].retry
        return Retry(max=retry.max, interval=retry.backoff) if retry.max else None

    def submit(
        self,
        pipeline: Pipeline,
        params: dict[str, Any],
        *,
        after_run: str | None = None,
        run_id: str | None = None,
    ) -> str | None:
        """Enqueue a run; None when another run of this pipeline is active.

        `after_run` chains this run behind another one (etl -> train): its first step waits for
        that run's last step, and if that run fails, this one is cancelled with it.
        """
        run_id = run_id or f"{pipeline.name}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        after: str | None = None
        if after_run is not None:
            upstream = self.conn.hget(keys.pipeline_run(after_run), "jobs")
            if upstream is None:
                raise LookupError(f"cannot chain after unknown run {after_run}")
            if self.run_status(after_run) == RUN_FAILED:
                raise RuntimeError(f"cannot chain after failed run {after_run}")
            after = json.loads(upstream)[-1]
        if not self._acquire(pipeline.name, run_id):
            log.info("pipeline_busy", pipeline=pipeline.name, active_run=self.active_run(pipeline.name))
            return None
        job_ids = [f"{run_id}--{step.name}" for step in pipeline.steps]
        record = {
            "pipeline": pipeline.name,
            "status": RUN_QUEUED,
            "created_at": _now_iso(),
            "params": json.dumps(params, sort_keys=True),
            "steps": json.dumps([s.name for s in pipeline.steps]),
            "jobs": json.dumps(job_ids),
            "after_run": after_run or "",
        }
        ttl = int(self.config.result_ttl.total_seconds())
        with self.conn.pipeline() as pipe:
            pipe.hset(keys.pipeline_run(run_id), mapping=record)
            pipe.expire(keys.pipeline_run(run_id), ttl)
            pipe.zadd(keys.pipeline_runs(pipeline.name), {run_id: time.time()})
            if after_run is not None:
                pipe.rpush(keys.pipeline_followers(after_run), run_id)
                pipe.expire(keys.pipeline_followers(after_run), ttl)
            pipe.execute()
        previous: str | None = after
        for step, job_id in zip(pipeline.steps, job_ids, strict=True):
            if step.name not in self.config.steps:
                raise KeyError(f"no pipeline.steps.{step.name} in config (timeout and retries)")
            queue = Queue(step.queue, connection=self.conn)
            queue.enqueue(
                execute_step,
                step.func,
                params,
                run_id,
                pipeline.name,
                step.name,
                job_id == job_ids[-1],
                int(self.config.lock_ttl.total_seconds() * 1000),
                job_id=job_id,
                description=f"{pipeline.name}.{step.name} ({run_id})",
                depends_on=previous,
                job_timeout=int(self.config.steps[step.name].timeout.total_seconds()),
                result_ttl=ttl,
                failure_ttl=ttl,
                retry=self._retry(step.name),
                on_failure=Callback(on_step_failure),
                meta={"run_id": run_id, "pipeline": pipeline.name, "step": step.name},
            )
            previous = job_id
        log.info(
            "pipeline_submitted", pipeline=pipeline.name, run_id=run_id, params=params, after_run=after_run
        )
        return run_id

    # ------------------------------------------------------------------ locking

    def _acquire(self, name: str, run_id: str) -> bool:
        ttl_ms = int(self.config.lock_ttl.total_seconds() * 1000)
        if self.conn.set(keys.pipeline_lock(name), run_id, nx=True, px=ttl_ms):
            return True
        holder = self.active_run(name)
        if holder is None or self.run_status(holder) in TERMINAL:
            # The holder is gone or over (a crash skipped its release): take the lock over.
            self._release(keys=[keys.pipeline_lock(name)], args=[holder or ""])
            return bool(self.conn.set(keys.pipeline_lock(name), run_id, nx=True, px=ttl_ms))
        return False

    def active_run(self, name: str) -> str | None:
        holder = self.conn.get(keys.pipeline_lock(name))
        return holder.decode() if holder else None

    def release(self, name: str, run_id: str) -> None:
        self._release(keys=[keys.pipeline_lock(name)], args=[run_id])

    # ------------------------------------------------------------------ reading

    def run_status(self, run_id: str) -> str | None:
        status = self.conn.hget(keys.pipeline_run(run_id), "status")
        return status.decode() if status else None

    def run(self, run_id: str) -> RunView | None:
        record = _decode(self.conn.hgetall(keys.pipeline_run(run_id)))
        if not record:
            return None
        steps = []
        for name, job_id in zip(json.loads(record["steps"]), json.loads(record["jobs"]), strict=True):
            try:
                job = Job.fetch(job_id, connection=self.conn)
                job_status = job.get_status(refresh=False)
                status = job_status.value if isinstance(job_status, JobStatus) else "unknown"
                started, ended = job.started_at, job.ended_at
                latest = job.latest_result() if status == JobStatus.FAILED else None
                error = _exception_line(latest.exc_string or "") if latest else None
            except NoSuchJobError:
                status, started, ended, error = "expired", None, None, None
            result = record.get(f"result:{name}")
            steps.append(
                StepView(
                    name=name,
                    job_id=job_id,
                    status=status,
                    started_at=started.isoformat(timespec="seconds") if started else None,
                    ended_at=ended.isoformat(timespec="seconds") if ended else None,
                    result=json.loads(result) if result else None,
                    error=error,
                )
            )
        return RunView(
            run_id,
            record["pipeline"],
            record["status"],
            record["created_at"],
            json.loads(record["params"]),
            steps,
        )

    def runs(self, name: str, limit: int = 20) -> list[RunView]:
        run_ids = self.conn.zrevrange(keys.pipeline_runs(name), 0, limit - 1)
        views = [self.run(r.decode()) for r in run_ids]
        return [v for v in views if v is not None]

    def wait(self, run_id: str, timeout_s: float, poll_s: float = 0.2) -> RunView:
        """Block until the run is over (for CLIs and tests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.run_status(run_id) in TERMINAL:
                break
            time.sleep(poll_s)
        view = self.run(run_id)
        if view is None:
            raise LookupError(f"run {run_id} not found")
        return view


# ---------------------------------------------------------------------- worker side


def resolve(dotted: str) -> Callable[..., dict[str, Any]]:
    module, _, name = dotted.rpartition(".")
    func: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), name)
    return func


class LockKeeper:
    """Renews a run's pipeline lock while one of its steps works (a context manager around the
    step): every third of the TTL while the lock is this run's, taking it back if it expired
    while the step waited in the queue (unless another run holds it by then)."""

    def __init__(self, conn: Redis, pipeline: str, run_id: str, ttl_ms: int) -> None:
        self.conn, self.key, self.run_id, self.ttl_ms = conn, keys.pipeline_lock(pipeline), run_id, ttl_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipeline-lock", daemon=True)
        self.renewals = 0

    def renew(self) -> bool:
        kept = bool(self.conn.eval(_RENEW, 1, self.key, self.run_id, self.ttl_ms))
        if not kept:
            log.warning("pipeline_lock_lost", lock=self.key, run_id=self.run_id)
        return kept

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                self.renewals += int(self.renew())
            except Exception as exc:  # a Redis hiccup: the next tick tries again, the step goes on
                log.warning("pipeline_lock_renewal_failed", lock=self.key, error=repr(exc))

    def __enter__(self) -> LockKeeper:
        self.renew()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def execute_step(
    func_path: str,
    params: dict[str, Any],
    run_id: str,
    pipeline: str,
    step: str,
    is_last: bool,
    lock_ttl_ms: int,
) -> dict[str, Any]:
    """The job every step runs as: marks the run, keeps its lock, times the step, stores its summary."""
    job = get_current_job()
    assert job is not None, "execute_step runs inside an RQ job"
    conn = job.connection
    bound = log.bind(pipeline=pipeline, step=step, run_id=run_id, attempt=job.number_of_retries or 0)
    conn.hset(keys.pipeline_run(run_id), "status", RUN_RUNNING)
    bound.info("step_started")
    started = time.perf_counter()
    try:
        with LockKeeper(conn, pipeline, run_id, lock_ttl_ms):
            summary = resolve(func_path)(params, run_id)
    except PermanentStepError as exc:
        job.retries_left = 0  # the worker reads this before deciding to retry
        STEP_OUTCOMES.labels(pipeline, step, "failed").inc()
        bound.error("step_failed_permanently", error=str(exc))
        raise
    except Exception as exc:
        STEP_OUTCOMES.labels(pipeline, step, "error").inc()
        bound.warning("step_error", error=repr(exc), retries_left=job.retries_left)
        raise
    seconds = time.perf_counter() - started
    STEP_SECONDS.labels(pipeline, step).observe(seconds)
    STEP_OUTCOMES.labels(pipeline, step, "succeeded").inc()
    summary = {**summary, "seconds": round(seconds, 3)}
    conn.hset(keys.pipeline_run(run_id), f"result:{step}", json.dumps(summary, default=str))
    if is_last:
        conn.hset(keys.pipeline_run(run_id), "status", RUN_FINISHED)
        conn.eval(_RELEASE, 1, keys.pipeline_lock(pipeline), run_id)
        LAST_SUCCESS.labels(pipeline).set(time.time())
    bound.info(
        "step_finished", seconds=round(seconds, 3), **{k: v for k, v in summary.items() if k != "seconds"}
    )
    return summary


def on_step_failure(job: Job, connection: Redis, *exc_info: object) -> None:
    """Runs after every failed attempt; acts only on the final one (no retries left)."""
    if job.retries_left:
        return
    meta = job.meta or {}
    run_id, pipeline = meta.get("run_id"), meta.get("pipeline")
    if not run_id or not pipeline:
        return
    _fail_run(connection, run_id, pipeline, after_job=job.id)
    log.error("pipeline_failed", pipeline=pipeline, run_id=run_id, step=meta.get("step"))


def _fail_run(connection: Redis, run_id: str, pipeline: str, after_job: str | None) -> None:
    """Mark a run failed, cancel its remaining steps and every run chained after it, free its lock.

    Downstream jobs would otherwise wait forever on a dependency that will never finish.
    """
    connection.hset(keys.pipeline_run(run_id), "status", RUN_FAILED)
    record = connection.hget(keys.pipeline_run(run_id), "jobs")
    job_ids: list[str] = json.loads(record) if record else []
    start = job_ids.index(after_job) + 1 if after_job in job_ids else 0
    for later in job_ids[start:]:
        try:
            Job.fetch(later, connection=connection).cancel()
        except Exception:
            continue
    connection.eval(_RELEASE, 1, keys.pipeline_lock(pipeline), run_id)
    for follower in connection.lrange(keys.pipeline_followers(run_id), 0, -1):
        follower_id = follower.decode()
        name = connection.hget(keys.pipeline_run(follower_id), "pipeline")
        if name is not None:
            connection.hset(keys.pipeline_run(follower_id), "error", f"upstream run {run_id} failed")
            _fail_run(connection, follower_id, name.decode(), after_job=None)
