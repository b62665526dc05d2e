"""The trainer's pipeline steps: load -> train -> evaluate -> export -> register.

Steps hand over through a working directory per pipeline run (lake/training/<run_id>/) and one
MLflow run that each step resumes. Every step rewrites its own outputs atomically, so a retried
step (a killed worker, a timeout) starts clean; only the last step touches the registry, so a
failure anywhere before it leaves nothing registered, and a failure that a retry cannot fix marks
the MLflow run FAILED.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import onnx
import structlog
from mlflow import MlflowClient
from rq import get_current_job

from services.trainer import plots
from services.trainer.data import Dataset, DatasetError, check_dataset, resolve_dataset
from services.trainer.evaluate import evaluate as evaluate_model
from services.trainer.export import ParityError, contract, export_onnx, parity_check
from services.trainer.training import load_checkpoint, save_checkpoint, train_model
from shared.config import DataConfig, ModelConfig
from shared.connections import queue_redis
from shared.features import FeatureSpec
from shared.lake import write_json_atomic
from shared.modeltags import DATASET_TAG, FEATURE_VERSION_TAG, PIPELINE_RUN_TAG
from shared.pipeline import PermanentStepError
from shared.registry import Registry, configure_tracking, default_artifact_root
from shared.settings import Settings, get_settings
from shared.world.runtime import live_world

log = structlog.get_logger(__name__)

STATE = "state.json"
CHECKPOINT = "model.pt"
ONNX_FILE = "model.onnx"
CONTRACT = "contract.json"
METRICS = "metrics.json"
RUN_TAG = PIPELINE_RUN_TAG


@dataclass(frozen=True)
class Context:
    settings: Settings
    data: DataConfig
    model: ModelConfig
    spec: FeatureSpec
    workdir: Path

    def state(self) -> dict[str, Any]:
        path = self.workdir / STATE
        if not path.exists():
            raise PermanentStepError(f"no {STATE} in {self.workdir}: the load step has not run")
        state: dict[str, Any] = json.loads(path.read_text())
        return state

    def dataset(self) -> Dataset:
        state = self.state()
        return Dataset(
            Path(state["dataset_dir"]), json.loads((Path(state["dataset_dir"]) / "manifest.json").read_text())
        )


def context(run_id: str) -> Context:
    settings = get_settings()
    data = settings.data_config()
    configure_tracking(settings.mlflow_tracking_uri)
    workdir = settings.lake_path / "training" / run_id
    workdir.mkdir(parents=True, exist_ok=True)
    return Context(settings, data, settings.ranking_model_config(), FeatureSpec.from_config(data), workdir)


@contextmanager
def mlflow_run(ctx: Context) -> Iterator[str]:
    """Resume this pipeline run's MLflow run; a permanent failure marks it FAILED."""
    run_id = ctx.state()["mlflow_run_id"]
    try:
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            yield run_id
    except PermanentStepError:
        MlflowClient().set_terminated(run_id, status="FAILED")
        raise


def git_sha(settings: Settings) -> str:
    if settings.git_sha:
        return settings.git_sha
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def _progress(**fields: Any) -> None:
    """Visible in the RQ job's meta (rq dashboard, `pipeline show`) while the step runs."""
    job = get_current_job()
    if job is not None:
        job.meta.update(fields, pid=os.getpid())
        job.save_meta()  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- steps


def load(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Find and check the dataset; open the MLflow run with config, code version and manifest."""
    ctx = context(run_id)
    try:
        dataset = resolve_dataset(
            ctx.settings.lake_path / "features", ctx.spec.version, params.get("dataset_id")
        )
        rows = check_dataset(dataset)
    except DatasetError as exc:
        raise PermanentStepError(str(exc)) from exc
    registry = ctx.model.registry
    experiment = mlflow.get_experiment_by_name(registry.experiment)
    if experiment is None:
        artifact_root = default_artifact_root(
            ctx.settings.mlflow_tracking_uri, ctx.settings.mlflow_artifact_root
        )
        experiment_id = mlflow.create_experiment(registry.experiment, artifact_location=artifact_root)
    else:
        experiment_id = experiment.experiment_id
    existing = _existing_run(experiment_id, run_id)
    with mlflow.start_run(run_id=existing, experiment_id=experiment_id, run_name=run_id) as run:
        mlflow.set_tags(
            {
                RUN_TAG: run_id,
                "feedrank.feature_version": ctx.spec.version,
                "feedrank.dataset_id": dataset.manifest["dataset_id"],
                "feedrank.profile": ctx.settings.profile,
                "feedrank.architecture": ctx.model.architecture,
                "mlflow.source.git.commit": git_sha(ctx.settings),
            }
        )
        mlflow.log_params(_flatten("model", ctx.model.model_dump(mode="json")))
        mlflow.log_params(_flatten("features", ctx.data.features.model_dump(mode="json")))
        mlflow.log_params({f"dataset.rows.{k}": v for k, v in rows.items()})
        mlflow.log_dict(dataset.manifest, "dataset/manifest.json")
    write_json_atomic(
        {"mlflow_run_id": run.info.run_id, "dataset_dir": str(dataset.directory), "params": params},
        ctx.workdir / STATE,
    )
    return {"dataset_id": dataset.manifest["dataset_id"], "mlflow_run_id": run.info.run_id, **rows}


def _existing_run(experiment_id: str, run_id: str) -> str | None:
    """A retried load step reuses the MLflow run it created, instead of leaving an orphan."""
    found = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'", max_results=1
    )
    return found[0].info.run_id if found else None


def train(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    ctx = context(run_id)
    dataset = ctx.dataset()
    train_split, validation = dataset.load("train"), dataset.load("validation")
    _progress(stage="training", rows=len(train_split))
    with mlflow_run(ctx):

        def on_epoch(metrics: dict[str, float]) -> None:
            epoch = int(metrics["epoch"])
            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            _progress(stage="training", epoch=epoch, val_auc=round(metrics["val_auc"], 4))

        half_life = params.get("recency_half_life_ms")
        if half_life is not None:
            mlflow.log_param("training.recency_half_life_ms", half_life)
        result = train_model(ctx.model, dataset.dense_names, train_split, validation, on_epoch, half_life)
        tmp = ctx.workdir / f".{CHECKPOINT}.{os.getpid()}.tmp"
        save_checkpoint(result, tmp)
        tmp.replace(ctx.workdir / CHECKPOINT)
        mlflow.log_metrics({"train_seconds": result.seconds, "best_epoch": result.best_epoch})
        mlflow.log_artifact(str(plots.loss_curves(result.history, ctx.workdir / "loss_curves.png")), "plots")
    best = result.history[result.best_epoch - 1]
    return {
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "val_auc": round(best["val_auc"], 5),
        "val_log_loss": round(best["val_log_loss"], 5),
        "train_seconds": round(result.seconds, 2),
        "device": result.device,
    }


def evaluate(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Test metrics for the model, the popularity baseline and the oracle, with the lift share.

    The oracle is the live world, with any drift injected at run time, exactly as the monitor's:
    after a drift the static config describes a world that no longer exists (and after a new item
    cohort, one without the new items)."""
    ctx = context(run_id)
    dataset = ctx.dataset()
    model, _ = load_checkpoint(ctx.workdir / CHECKPOINT)
    test = dataset.load("test")
    with mlflow_run(ctx):
        try:
            report = evaluate_model(
                model,
                test,
                dataset.dense_names,
                ctx.spec,
                live_world(ctx.data, queue_redis(ctx.settings)),
                ctx.model,
            )
        except ValueError as exc:
            raise PermanentStepError(str(exc)) from exc
        mlflow.log_metrics(report.flat())
        mlflow.log_dict(report.summary(), "evaluation/metrics.json")
        mlflow.log_artifact(str(plots.reliability_diagram(report, ctx.workdir / "reliability.png")), "plots")
        mlflow.log_artifact(
            str(plots.score_histograms(report, test.labels, ctx.workdir / "scores.png")), "plots"
        )
    write_json_atomic(report.summary(), ctx.workdir / METRICS)
    k = ctx.model.evaluation.ndcg_k
    m = report.metrics
    return {
        "model_auc": round(m["model"]["auc"], 5),
        f"model_ndcg_at_{k}": round(m["model"][f"ndcg_at_{k}"], 5),
        f"popularity_ndcg_at_{k}": round(m["popularity"][f"ndcg_at_{k}"], 5),
        f"oracle_ndcg_at_{k}": round(m["oracle"][f"ndcg_at_{k}"], 5),
        f"lift_ndcg_at_{k}": round(report.lift[f"ndcg_at_{k}"], 4),
        "lift_auc": round(report.lift["auc"], 4),
    }


def export(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """ONNX with a dynamic batch, its input contract, and the parity check against torch."""
    ctx = context(run_id)
    dataset = ctx.dataset()
    model, spec = load_checkpoint(ctx.workdir / CHECKPOINT)
    test = dataset.load("test")
    with mlflow_run(ctx):
        tmp = ctx.workdir / f".{ONNX_FILE}.{os.getpid()}.tmp"
        export_onnx(model, tmp, len(spec.dense_names), ctx.model.export.opset)
        cfg = ctx.model.export
        try:
            diff = parity_check(model, tmp, test, cfg.parity_rows, cfg.parity_tolerance)
        except ParityError as exc:
            tmp.unlink(missing_ok=True)
            raise PermanentStepError(str(exc)) from exc
        tmp.replace(ctx.workdir / ONNX_FILE)
        write_json_atomic(
            contract(spec.dense_names, dataset.feature_version, spec.architecture), ctx.workdir / CONTRACT
        )
        mlflow.log_metric("onnx_parity_max_abs_diff", diff)
    return {"parity_max_abs_diff": diff, "bytes": (ctx.workdir / ONNX_FILE).stat().st_size}


def register(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Log the ONNX model, register a version with its tags, set its alias. Idempotent per run."""
    ctx = context(run_id)
    registry = Registry(ctx.settings.mlflow_tracking_uri, ctx.model.registry)
    metrics = json.loads((ctx.workdir / METRICS).read_text())
    state = ctx.state()
    version = next((v for v in registry.versions() if v.tags.get(RUN_TAG) == run_id), None)
    if version is None:
        k = ctx.model.evaluation.ndcg_k
        tags = {
            RUN_TAG: run_id,
            FEATURE_VERSION_TAG: ctx.spec.version,
            DATASET_TAG: ctx.dataset().manifest["dataset_id"],
            "architecture": ctx.model.architecture,
            "git_sha": git_sha(ctx.settings),
            "test_auc": f"{metrics['metrics']['model']['auc']:.6f}",
            f"test_ndcg_at_{k}": f"{metrics['metrics']['model'][f'ndcg_at_{k}']:.6f}",
            "test_log_loss": f"{metrics['metrics']['model']['log_loss']:.6f}",
            f"lift_ndcg_at_{k}": f"{metrics['lift'][f'ndcg_at_{k}']:.6f}",
        }
        with mlflow_run(ctx):
            info = mlflow.onnx.log_model(
                onnx.load(str(ctx.workdir / ONNX_FILE)),
                name="model",
                metadata={"contract": json.loads((ctx.workdir / CONTRACT).read_text())},
                save_as_external_data=False,
            )
            mv = mlflow.register_model(info.model_uri, registry.name, tags=tags)
        version = registry.get(int(mv.version))
    alias = params.get("alias") or (
        ctx.model.registry.challenger_alias
        if registry.by_alias(ctx.model.registry.champion_alias)
        else ctx.model.registry.champion_alias
    )
    if alias == ctx.model.registry.champion_alias:
        registry.promote(version.version)
    else:
        registry.set_alias(alias, version.version)
    MlflowClient().set_terminated(state["mlflow_run_id"], status="FINISHED")
    log.info("model_registered", version=version.version, alias=alias, model=registry.name)
    return {"model": registry.name, "version": version.version, "alias": alias}
