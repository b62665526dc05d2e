"""Pipeline definitions: the seed's Airflow DAGs as data (steps, dotted paths, queues).

They live in the shared library, not in a service, so that any service or CLI can submit or chain
any pipeline without importing another service's code: a step is only a dotted path, resolved by
whichever worker consumes its queue.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from redis import Redis

from shared.clock import AcceleratedClock, Clock
from shared.config import DataConfig, ModelConfig, MonitoringConfig
from shared.lake import dataset_id
from shared.modeltags import CANDIDATE_ALIAS
from shared.pipeline import Pipeline, PipelineRunner, Step
from shared.timeutil import MINUTE_MS, duration_ms, to_ms

Source = Literal["simulate", "lake"]

CANDIDATE = CANDIDATE_ALIAS
"""Registry alias of a freshly trained model waiting for the offline gate."""


def _dataset_steps(config: DataConfig) -> tuple[Step, ...]:
    """validate -> features -> split: an offline dataset from events already in the lake."""
    q = config.queues
    return (
        Step("validate", "services.feature.jobs.validate_window", q.features),
        Step("features", "services.feature.jobs.build_features", q.features),
        Step("split", "services.feature.jobs.split_dataset", q.features),
    )


def etl_pipeline(config: DataConfig) -> Pipeline:
    """generate -> validate -> features -> split -> materialize."""
    q = config.queues
    return Pipeline(
        "etl",
        (
            Step("generate", "services.ingest.jobs.generate", q.ingest),
            *_dataset_steps(config),
            Step("materialize", "services.feature.jobs.materialize", q.features),
        ),
    )


def refresh_pipeline(config: DataConfig) -> Pipeline:
    """materialize only: the online store as of now, from the events already in the lake.

    What the schedule runs: serving needs fresh counters, not a new training set every few
    minutes (etl builds those when a training wants one; a retrain builds its own)."""
    return Pipeline(
        "refresh", (Step("materialize", "services.feature.jobs.materialize", config.queues.features),)
    )


def submit_refresh(conn: Redis, config: DataConfig) -> str | None:
    clock = AcceleratedClock.shared(conn, config)
    return PipelineRunner(conn, config.pipeline).submit(
        refresh_pipeline(config), etl_params(config, "lake", clock=clock)
    )


def dataset_pipeline(config: DataConfig) -> Pipeline:
    """validate -> features -> split on events already in the lake: a retrain's training set.

    A pipeline of its own (its own lock), so a retrain never waits for, nor trains on the dataset
    of, a scheduled etl run, whose span and splits are the bootstrap's, not the retrain's.
    """
    return Pipeline("dataset", _dataset_steps(config))


def etl_params(
    config: DataConfig, source: Source, end: datetime | None = None, clock: Clock | None = None
) -> dict[str, Any]:
    """The window of a run: `dataset.span` ending at `end`.

    Defaults: for a simulated backfill, the end of the backfilled history (live_start); for the
    lake, the world clock's now, floored to the minute so that reruns within a minute agree.
    """
    if end is not None:
        end_ms = to_ms(end)
    elif source == "simulate":
        end_ms = to_ms(config.live_start)
    else:
        assert clock is not None, "a lake run needs the world clock"
        end_ms = clock.now_ms() // MINUTE_MS * MINUTE_MS
    start_ms = max(end_ms - duration_ms(config.dataset.span), to_ms(config.world.start))
    return {"source": source, "start_ms": start_ms, "end_ms": end_ms}


def submit_etl(conn: Redis, config: DataConfig, source: Source, end: datetime | None = None) -> str | None:
    clock = AcceleratedClock.shared(conn, config) if source == "lake" and end is None else None
    return PipelineRunner(conn, config.pipeline).submit(
        etl_pipeline(config), etl_params(config, source, end, clock)
    )


def train_pipeline(model: ModelConfig, data: DataConfig) -> Pipeline:
    """load -> train -> evaluate -> export -> register, on the training queue."""
    q = data.queues.training
    steps = ("load", "train", "evaluate", "export", "register")
    return Pipeline("train", tuple(Step(name, f"services.trainer.jobs.{name}", q) for name in steps))


def submit_train(
    conn: Redis,
    model: ModelConfig,
    data: DataConfig,
    *,
    after_run: str | None = None,
    dataset_id: str | None = None,
    alias: str | None = None,
) -> str | None:
    """A training run on a dataset (default: the newest of the current feature version), optionally
    chained after an etl run. `alias` forces the registry alias; by default the first model becomes
    champion and later ones challenger."""
    params: dict[str, Any] = {"dataset_id": dataset_id, "alias": alias}
    return PipelineRunner(conn, model.pipeline).submit(
        train_pipeline(model, data), params, after_run=after_run
    )


def submit_etl_then_train(
    conn: Redis, data: DataConfig, model: ModelConfig, source: Source, end: datetime | None = None
) -> tuple[str, str] | None:
    """The bootstrap chain: an etl run and a training run that waits for it."""
    etl_run = submit_etl(conn, data, source, end)
    if etl_run is None:
        return None
    train_run = submit_train(conn, model, data, after_run=etl_run)
    if train_run is None:
        return None
    return etl_run, train_run


def monitor_pipeline(data: DataConfig, monitoring: MonitoringConfig) -> Pipeline:
    """serving_window (feature worker) -> assess -> act (monitor worker)."""
    return Pipeline(
        "monitor",
        (
            Step("serving_window", "services.feature.jobs.build_serving_window", data.queues.features),
            Step("assess", "services.monitor.jobs.assess", data.queues.monitoring),
            Step("act", "services.monitor.jobs.act", data.queues.monitoring),
        ),
    )


def monitor_params(monitoring: MonitoringConfig, clock: Clock) -> dict[str, Any]:
    end_ms = clock.now_ms() // MINUTE_MS * MINUTE_MS
    return {
        "start_ms": end_ms - duration_ms(monitoring.windows.serving),
        "end_ms": end_ms,
        "label_delay_ms": duration_ms(monitoring.windows.label_delay),
    }


def submit_monitor(conn: Redis, data: DataConfig, monitoring: MonitoringConfig) -> str | None:
    clock = AcceleratedClock.shared(conn, data)
    runner = PipelineRunner(conn, monitoring.pipeline)
    return runner.submit(monitor_pipeline(data, monitoring), monitor_params(monitoring, clock))


def gate_pipeline(data: DataConfig) -> Pipeline:
    return Pipeline("gate", (Step("gate", "services.monitor.gate.gate", data.queues.monitoring),))


def submit_retrain(
    conn: Redis, data: DataConfig, model: ModelConfig, monitoring: MonitoringConfig, reason: str
) -> dict[str, str] | None:
    """The retraining DAG: a dataset of the recent lake window -> train a candidate on exactly that
    dataset -> offline gate. Returns the run ids, or None when a retrain is already in flight."""
    clock = AcceleratedClock.shared(conn, data)
    params = etl_params(data, "lake", clock=clock)
    params["start_ms"] = max(
        params["end_ms"] - duration_ms(monitoring.retrain.window), to_ms(data.world.start)
    )
    params["validation_ms"] = duration_ms(monitoring.retrain.validation)
    params["test_ms"] = duration_ms(monitoring.retrain.test)
    dataset_run = PipelineRunner(conn, data.pipeline).submit(dataset_pipeline(data), params)
    if dataset_run is None:
        return None
    train_run = PipelineRunner(conn, model.pipeline).submit(
        train_pipeline(model, data),
        {
            "dataset_id": dataset_id(params["start_ms"], params["end_ms"]),
            "alias": CANDIDATE,
            "reason": reason,
            "recency_half_life_ms": (
                duration_ms(monitoring.retrain.recency_half_life)
                if monitoring.retrain.recency_half_life is not None
                else None
            ),
        },
        after_run=dataset_run,
    )
    if train_run is None:
        return None
    gate_run = PipelineRunner(conn, monitoring.pipeline).submit(
        gate_pipeline(data), {"train_run": train_run}, after_run=train_run
    )
    return {"dataset": dataset_run, "train": train_run, "gate": gate_run or ""}
