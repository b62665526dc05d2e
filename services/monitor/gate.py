"""The offline gate of the retraining DAG: the candidate against the champion on the same fresh
holdout (the candidate's own test split, which the champion never saw). Pass: the candidate
serves the A/B share as challenger. Fail: it is tagged and never serves."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.monitor import audit
from shared.clock import AcceleratedClock
from shared.config import GateConfig
from shared.connections import lake, queue_redis
from shared.evaluation import auc, log_loss, ndcg_at_k
from shared.features import ID_COLUMNS
from shared.modeltags import (
    CANDIDATE_ALIAS,
    CHALLENGER_SINCE_TAG,
    DATASET_TAG,
    FEATURE_VERSION_TAG,
    GATE_TAG,
    PIPELINE_RUN_TAG,
)
from shared.pipeline import PermanentStepError
from shared.registry import Registry
from shared.settings import get_settings

Scorer = Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]
"""(dense float32 matrix, id columns) -> P(click) per row."""


def onnx_scorer(model_dir: Path) -> Scorer:
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}

    def score(dense: np.ndarray, ids: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {
            "dense": np.ascontiguousarray(dense, dtype=np.float32),
            **{c: ids[c] for c in ID_COLUMNS if c in inputs},
        }
        (scores,) = session.run(["score"], feeds)
        return np.asarray(scores, dtype=np.float64)

    return score


def holdout_metrics(score: Scorer, table: pa.Table, dense_names: list[str], k: int) -> dict[str, float]:
    """NDCG@k and AUC of the position-free ranking, log loss at the served positions."""
    dense = np.column_stack([table[c].to_numpy().astype(np.float32) for c in dense_names])
    ids = {c: table[c].to_numpy().astype(np.int64) for c in ID_COLUMNS}
    labels = table["label"].to_numpy().astype(np.float64)
    requests = pc.dictionary_encode(table["request_id"]).combine_chunks().indices.to_numpy()
    served = score(dense, ids)
    top = dense.copy()
    top[:, dense_names.index("position")] = 0
    ranking = score(top, ids)
    return {
        "ndcg": ndcg_at_k(requests, labels, ranking, k),
        "auc": auc(labels, ranking),
        "log_loss": log_loss(labels, served),
    }


def passes(candidate: dict[str, float], champion: dict[str, float], config: GateConfig) -> bool:
    """Better ranking by the margins, and probabilities not worse beyond the tolerance."""
    return (
        candidate["ndcg"] >= champion["ndcg"] + config.ndcg_margin
        and candidate["auc"] >= champion["auc"] + config.auc_margin
        and candidate["log_loss"] <= champion["log_loss"] + config.log_loss_tolerance
    )


def gate(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Pipeline step: gate the version that `params["train_run"]` registered."""
    settings = get_settings()
    data, model, monitoring = (
        settings.data_config(),
        settings.ranking_model_config(),
        settings.monitoring_config(),
    )
    conn, the_lake = queue_redis(settings), lake(settings)
    registry = Registry(settings.mlflow_tracking_uri, model.registry)
    candidate = next(
        (v for v in registry.versions() if v.tags.get(PIPELINE_RUN_TAG) == params["train_run"]), None
    )
    if candidate is None:
        raise PermanentStepError(f"no model version was registered by {params['train_run']}")
    champion = registry.by_alias(model.registry.champion_alias)
    if champion is None:
        registry.promote(candidate.version)
        registry.remove_alias(CANDIDATE_ALIAS)
        audit.record(
            conn, the_lake.root, "gate_passed", candidate_version=candidate.version, why="no champion"
        )
        return {"decision": "promoted", "version": candidate.version}
    if champion.tags.get(FEATURE_VERSION_TAG) != candidate.tags.get(FEATURE_VERSION_TAG):
        registry.remove_alias(CANDIDATE_ALIAS)
        registry.set_version_tag(candidate.version, GATE_TAG, "failed")
        raise PermanentStepError(
            f"champion v{champion.version} and candidate v{candidate.version} use different feature "
            "versions; promote by hand after an offline comparison"
        )
    dataset = the_lake.features_dir / candidate.tags[FEATURE_VERSION_TAG] / candidate.tags[DATASET_TAG]
    manifest = json.loads((dataset / "manifest.json").read_text())
    holdout = pq.read_table(dataset / "test.parquet")
    k = model.evaluation.ndcg_k
    workdir = the_lake.monitoring_run_dir("gate") / run_id
    mine, theirs = (
        holdout_metrics(
            onnx_scorer(registry.download(v.version, workdir / f"v{v.version}")),
            holdout,
            manifest["dense"],
            k,
        )
        for v in (candidate, champion)
    )
    gate_cfg = monitoring.retrain.gate
    passed = passes(mine, theirs, gate_cfg)
    figures = {
        "candidate_version": candidate.version,
        "champion_version": champion.version,
        "holdout": manifest["dataset_id"],
        "holdout_rows": holdout.num_rows,
        **{f"candidate_{name}": value for name, value in mine.items()},
        **{f"champion_{name}": value for name, value in theirs.items()},
    }
    if passed:
        now = AcceleratedClock.shared(conn, data).now_ms()
        registry.set_version_tag(candidate.version, CHALLENGER_SINCE_TAG, str(now))
        registry.set_alias(model.registry.challenger_alias, candidate.version)
    else:
        registry.set_version_tag(candidate.version, GATE_TAG, "failed")
    registry.remove_alias(CANDIDATE_ALIAS)
    audit.record(
        conn,
        the_lake.root,
        "gate_passed" if passed else "gate_failed",
        **figures,
        margins=gate_cfg.model_dump(),
    )
    return {"decision": "challenger" if passed else "rejected", **figures}
