"""The train pipeline through real RQ workers and a real MLflow store: etl, then training,
evaluation, ONNX export and registration, and what happens when things go wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from rq.job import Job

from shared.dags import submit_etl_then_train, submit_train
from shared.pipeline import PipelineRunner, RunView
from shared.registry import Registry
from shared.settings import Settings
from tests.conftest import RedisPair
from tests.support import REPO_ROOT, run_worker

pytestmark = pytest.mark.integration

ALL_QUEUES = ["ingest", "features", "training"]


def bootstrap(
    settings: Settings, service_env: dict[str, str], redis_pair: RedisPair
) -> tuple[RunView, RunView]:
    data, model = settings.data_config(), settings.ranking_model_config()
    chain = submit_etl_then_train(redis_pair.queue, data, model, "simulate")
    assert chain is not None
    result = run_worker(service_env, ALL_QUEUES)
    assert result.returncode == 0, result.stderr[-3000:]
    runner = PipelineRunner(redis_pair.queue, model.pipeline)
    views = [runner.run(r) for r in chain]
    assert views[0] is not None
    assert views[1] is not None
    return views[0], views[1]


def registry(settings: Settings) -> Registry:
    return Registry(settings.mlflow_tracking_uri, settings.ranking_model_config().registry)


@pytest.fixture
def champion_env(
    settings: Settings, service_env: dict[str, str], redis_pair: RedisPair
) -> tuple[RunView, RunView]:
    return bootstrap(settings, service_env, redis_pair)


def test_etl_then_train_registers_a_champion(
    champion_env: tuple[RunView, RunView], settings: Settings, tmp_path: Path
) -> None:
    etl, train = champion_env
    assert etl.status == "finished"
    assert train.status == "finished", [(s.name, s.status, s.error) for s in train.steps]
    assert [s.name for s in train.steps] == ["load", "train", "evaluate", "export", "register"]
    evaluation = train.steps[2].result
    assert evaluation is not None
    assert evaluation["model_auc"] > 0.6  # it learned something on a tiny world
    assert train.steps[3].result["parity_max_abs_diff"] < 1e-4  # type: ignore[index]

    reg = registry(settings)
    champion = reg.by_alias("champion")
    assert champion is not None
    assert champion.version == 1
    assert champion.tags["feature_version"].startswith("fv")
    assert float(champion.tags["test_auc"]) == pytest.approx(evaluation["model_auc"], abs=1e-5)
    assert reg.by_alias("challenger") is None

    directory = reg.download(champion.version, tmp_path / "download")
    contract = Registry.contract(directory)
    session = ort.InferenceSession(str(directory / "model.onnx"))
    n = 7
    feeds: dict[str, np.ndarray] = {
        "dense": np.zeros((n, len(contract["inputs"][0]["columns"])), dtype=np.float32),
        **{spec["name"]: np.arange(n, dtype=np.int64) for spec in contract["inputs"][1:]},
    }
    feeds["user_id"][0] = 10**12  # an id the model never saw: the unknown embedding, not a crash
    (scores,) = session.run(["score"], feeds)
    assert scores.shape == (n,)
    assert ((scores > 0) & (scores < 1)).all()


def test_the_mlflow_run_holds_everything(champion_env: tuple[RunView, RunView], settings: Settings) -> None:
    _, train = champion_env
    run_id = train.steps[0].result["mlflow_run_id"]  # type: ignore[index]
    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["feedrank.feature_version"].startswith("fv")
    assert run.data.tags["mlflow.source.git.commit"]
    assert "model.training.learning_rate" in run.data.params
    assert len(client.get_metric_history(run_id, "val_auc")) >= 1
    for metric in (
        "test_model_auc",
        "test_oracle_ndcg_at_10",
        "test_popularity_ndcg_at_10",
        "lift_ndcg_at_10",
        "test_model_ece",
    ):
        assert metric in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "plots")
    }
    assert {"dataset", "plots/loss_curves.png", "plots/reliability.png", "plots/scores.png"} <= artifacts


def test_a_second_model_becomes_challenger_and_the_cli_promotes_and_rolls_back(
    champion_env: tuple[RunView, RunView],
    settings: Settings,
    service_env: dict[str, str],
    redis_pair: RedisPair,
) -> None:
    run_id = submit_train(redis_pair.queue, settings.ranking_model_config(), settings.data_config())
    assert run_id is not None
    run_worker(service_env, ["training"])
    reg = registry(settings)
    assert reg.by_alias("challenger").version == 2  # type: ignore[union-attr]
    assert reg.by_alias("champion").version == 1  # type: ignore[union-attr]

    def cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "services.trainer", "registry", *args],
            cwd=REPO_ROOT, env={**os.environ, **service_env}, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip

    listing = cli("list")
    assert "challenger" in listing
    assert "champion" in listing
    assert "version 2 is now champion (was 1)" in cli("promote", "2")
    assert reg.by_alias("champion").version == 2  # type: ignore[union-attr]
    assert reg.by_alias("challenger") is None
    rolled = subprocess.run(
        [sys.executable, "-m", "services.monitor", "rollback"],
        cwd=REPO_ROOT, env={**os.environ, **service_env}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "rolled back from version 2 to version 1" in rolled  # the one rollback: audited, by the monitor
    assert reg.by_alias("champion").version == 1  # type: ignore[union-attr]


def _train_fails(
    settings: Settings, service_env: dict[str, str], redis_pair: RedisPair, **kwargs: str
) -> RunView:
    model = settings.ranking_model_config()
    run_id = submit_train(redis_pair.queue, model, settings.data_config(), **kwargs)
    assert run_id is not None
    run_worker(service_env, ["training"])
    view = PipelineRunner(redis_pair.queue, model.pipeline).run(run_id)
    assert view is not None
    assert view.status == "failed"
    return view


def test_no_dataset_fails_at_load_and_registers_nothing(
    settings: Settings, service_env: dict[str, str], redis_pair: RedisPair
) -> None:
    view = _train_fails(settings, service_env, redis_pair)
    assert "run the etl pipeline first" in (view.steps[0].error or "")
    assert [s.status for s in view.steps[1:]] == ["canceled"] * 4
    assert registry(settings).versions() == []


def test_nan_features_fail_at_load(
    champion_env: tuple[RunView, RunView],
    settings: Settings,
    service_env: dict[str, str],
    redis_pair: RedisPair,
) -> None:
    features = settings.lake_path / "features"
    (version_dir,) = [p for p in features.iterdir() if p.is_dir()]
    dataset = version_dir / (version_dir / "LATEST").read_text()
    train = pq.read_table(dataset / "train.parquet")
    column = train["user_topic_affinity"].to_numpy().copy()
    column[3] = np.nan
    pq.write_table(
        train.set_column(
            train.schema.get_field_index("user_topic_affinity"), "user_topic_affinity", pa.array(column)
        ),
        dataset / "train.parquet",
    )
    view = _train_fails(settings, service_env, redis_pair)
    assert "user_topic_affinity has NaN" in (view.steps[0].error or "")
    assert [v.version for v in registry(settings).versions()] == [1]


def test_feature_version_mismatch_fails_at_load(
    champion_env: tuple[RunView, RunView],
    settings: Settings,
    service_env: dict[str, str],
    redis_pair: RedisPair,
) -> None:
    features = settings.lake_path / "features"
    (version_dir,) = [p for p in features.iterdir() if p.is_dir()]
    dataset = version_dir / (version_dir / "LATEST").read_text()
    manifest = json.loads((dataset / "manifest.json").read_text())
    (dataset / "manifest.json").write_text(json.dumps({**manifest, "feature_version": "fv-old"}))
    view = _train_fails(settings, service_env, redis_pair)
    assert "feature version mismatch" in (view.steps[0].error or "")


def test_a_worker_killed_mid_training_leaves_nothing_registered_and_the_step_is_retried(
    champion_env: tuple[RunView, RunView],
    settings: Settings,
    service_env: dict[str, str],
    redis_pair: RedisPair,
) -> None:
    model = settings.ranking_model_config()
    run_id = submit_train(redis_pair.queue, model, settings.data_config())
    assert run_id is not None
    env = {**os.environ, **service_env}
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.trainer", "worker"], cwd=REPO_ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        job = Job.fetch(f"{run_id}--train", connection=redis_pair.queue)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "epoch" not in job.get_meta(refresh=True):
            time.sleep(0.05)
        horse = job.get_meta(refresh=True).get("pid")
        assert horse, "the train step never reported its progress"
        os.kill(horse, signal.SIGKILL)  # the OOM killer's way of ending a training run
        assert [v.version for v in registry(settings).versions()] == [1]  # nothing partial registered
        view = PipelineRunner(redis_pair.queue, model.pipeline).wait(run_id, timeout_s=120)
    finally:
        worker.terminate()
        try:
            worker.wait(30)  # a warm shutdown finishes the job in hand
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert view.status == "finished", [(s.name, s.status, s.error) for s in view.steps]
    assert (
        Job.fetch(f"{run_id}--train", connection=redis_pair.queue).retries_left
        == model.pipeline.steps["train"].retry.max - 1
    )
    assert [v.version for v in registry(settings).versions()] == [2, 1]
