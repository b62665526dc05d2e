"""The monitor's pipeline steps: assess (drift, quality, alerts, report) and act (retrain, A/B
decision); and the offline gate of the retraining DAG."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog
from scipy.stats import norm

from services.monitor import alerts, audit, report
from services.monitor.assess import (
    NOT_ENOUGH,
    WARMING_UP,
    Assessment,
    QualityFigures,
    feature_drift,
    join_served,
    ks_at_entity_size,
    oracle_expected_clicks,
    quality,
    sample,
)
from services.monitor.stats import psi, two_proportion_test
from shared import keys
from shared.clock import AcceleratedClock
from shared.config import DataConfig, ModelConfig, MonitoringConfig
from shared.connections import lake, queue_redis
from shared.dags import CANDIDATE, submit_retrain
from shared.evaluation import auc, log_loss, ndcg_at_k
from shared.features import ID_COLUMNS, FeatureSpec
from shared.lake import Lake, write_json_atomic, write_parquet_atomic
from shared.pipeline import PermanentStepError
from shared.registry import Registry, VersionInfo
from shared.settings import Settings, get_settings
from shared.timeutil import duration_ms, iso
from shared.world import World
from shared.world.runtime import live_world

log = structlog.get_logger(__name__)

CHALLENGER_SINCE = "feedrank.challenger_since_ms"
"""Version tag: sim time at which the version started serving as challenger."""


def _configs() -> tuple[Settings, DataConfig, ModelConfig, MonitoringConfig]:
    settings = get_settings()
    return settings, settings.data_config(), settings.ranking_model_config(), settings.monitoring_config()


def _registry(settings: Settings, model: ModelConfig) -> Registry:
    return Registry(settings.mlflow_tracking_uri, model.registry)


def baseline_path(the_lake: Lake, version: int) -> Path:
    return the_lake.root / "monitoring" / "baselines" / f"v{version}.parquet"


# --------------------------------------------------------------------------- assess


def assess(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Drift and quality of the serving window against each version's own serving baseline."""
    settings, data, model, monitoring = _configs()
    the_lake = lake(settings)
    conn = queue_redis(settings)
    spec = FeatureSpec.from_config(data)
    window = {"start": iso(params["start_ms"]), "end": iso(params["end_ms"] - params["label_delay_ms"])}
    examples = pq.read_table(the_lake.root / "monitoring" / run_id / "serving.parquet")
    served = the_lake.read_served(params["start_ms"], params["end_ms"])
    joined = join_served(examples, served)
    champion = _registry(settings, model).by_alias(model.registry.champion_alias)
    result = Assessment(run_id, window, "ok", joined.num_rows, champion.version if champion else None)
    model_rows = joined.filter(pc.is_valid(joined["model_version"])) if joined.num_rows else joined
    if champion is None or model_rows.num_rows < monitoring.windows.min_impressions:
        result.status = NOT_ENOUGH
        return _finish(conn, the_lake, result, settings, monitoring)

    world = live_world(data, conn)
    result.quality = quality(model_rows, world, monitoring)
    warmup_ms = int(monitoring.windows.baseline_warmup.total_seconds() * 1000)
    for version in sorted({q.model_version for q in result.quality}):
        rows = model_rows.filter(pc.equal(model_rows["model_version"], version))
        path = baseline_path(the_lake, version)
        if not path.exists():
            if params["start_ms"] < first_served_ms(conn, version, rows) + warmup_ms:
                if version == champion.version:
                    result.status = WARMING_UP
                continue
            write_parquet_atomic(sample(rows, monitoring.windows.reference_rows), path)
            if version == champion.version:
                result.status = "baseline_established"
            continue
        baseline = pq.read_table(path)
        current = sample(rows, monitoring.windows.reference_rows)
        if version == champion.version:
            result.features = feature_drift(baseline, current, spec.dense_names, monitoring)
            result.baseline_clicks, result.baseline_expected_clicks = baseline_clicks(path, baseline, world)
            result.baseline_ctr_ratio = result.baseline_clicks / max(result.baseline_expected_clicks, 1e-9)
        key = f"{rows['variant'][0].as_py()}/{version}"
        result.prediction_psi[key] = psi(
            baseline["score"].to_numpy(), current["score"].to_numpy(), monitoring.drift.psi_bins
        )
        result.prediction_significant[key] = ks_at_entity_size(
            baseline, current, "score", "item_id", monitoring
        ).drifted
    champion_quality = result.champion_quality()
    if champion_quality is not None and result.baseline_ctr_ratio:
        result.ctr_shortfall_p = click_shortfall_p(
            champion_quality, result.baseline_clicks, result.baseline_expected_clicks
        )
    result.alerts = _alerts(result, monitoring, window)
    return _finish(conn, the_lake, result, settings, monitoring)


def baseline_clicks(path: Path, baseline: pa.Table, world: World) -> tuple[int, float]:
    """A baseline's clicks and oracle-expected clicks: computed once (a loop over its requests and
    the live catalog), then read from beside the baseline, which never changes."""
    figures_path = path.with_suffix(".clicks.json")
    if figures_path.exists():
        figures = json.loads(figures_path.read_text())
    else:
        figures = {
            "clicks": int(pc.sum(baseline["label"]).as_py()),
            "oracle_expected_clicks": oracle_expected_clicks(baseline, world),
        }
        write_json_atomic(figures, figures_path)
    return int(figures["clicks"]), float(figures["oracle_expected_clicks"])


def first_served_ms(conn: Any, version: int, rows: pa.Table) -> int:
    """Sim time a version was first seen serving (kept in Redis: windows slide past it)."""
    seen = int(pc.min(rows["ts"]).as_py())
    conn.set(keys.MONITOR_FIRST_SERVED.format(version=version), seen, nx=True)
    return int(conn.get(keys.MONITOR_FIRST_SERVED.format(version=version)) or seen)


def click_shortfall_p(figures: QualityFigures, baseline_clicks: int, baseline_expected: float) -> float:
    """One-sided p-value that the window's ratio (clicks per oracle-expected click) is lower than
    the baseline's, both counted as Poisson (normal approximation): a small window's dip, or a
    lucky baseline, is noise, not a degraded model."""
    if figures.oracle_expected_clicks <= 0 or baseline_expected <= 0:
        return 1.0
    now = figures.clicks / figures.oracle_expected_clicks
    before = baseline_clicks / baseline_expected
    variance = (
        max(figures.clicks, 1) / figures.oracle_expected_clicks**2
        + max(baseline_clicks, 1) / baseline_expected**2
    )
    return float(norm.cdf((now - before) / np.sqrt(variance)))


def _alerts(result: Assessment, monitoring: MonitoringConfig, window: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cfg = monitoring.drift
    drifted = [f for f in result.features if f.level == "alert"]
    for f in result.features:
        if f.level != "ok":
            threshold = cfg.thresholds(f.feature)
            found.append(
                alerts.alert(
                    "warning",
                    "feature_drift",
                    f.feature,
                    f.psi,
                    threshold.psi_alert if f.level == "alert" else threshold.psi_warning,
                    window,
                    ks=f.ks,
                    ks_critical=f.ks_critical,
                    level=f.level,
                )
            )
    if len(drifted) >= cfg.alert_features:
        found.append(
            alerts.alert(
                "alert",
                "feature_drift",
                ",".join(f.feature for f in drifted),
                len(drifted),
                cfg.alert_features,
                window,
                model_version=result.champion_version,
            )
        )
    for key, value in result.prediction_psi.items():
        if value >= cfg.prediction_psi_warning:
            severity = (
                "alert"
                if value >= cfg.prediction_psi_alert
                and key.startswith("champion/")
                and result.prediction_significant.get(key, False)
                else "warning"
            )
            found.append(
                alerts.alert(severity, "prediction_drift", key, value, cfg.prediction_psi_alert, window)
            )
    champion_quality = result.champion_quality()
    if champion_quality is not None and result.baseline_ctr_ratio and result.ctr_shortfall_p is not None:
        floor = result.baseline_ctr_ratio * (1 - monitoring.quality.ctr_ratio_drop_alert)
        if champion_quality.ctr_ratio < floor and result.ctr_shortfall_p < monitoring.quality.alpha:
            found.append(
                alerts.alert(
                    "alert",
                    "quality",
                    "ctr_ratio",
                    champion_quality.ctr_ratio,
                    floor,
                    window,
                    baseline=result.baseline_ctr_ratio,
                    p_value=result.ctr_shortfall_p,
                    model_version=result.champion_version,
                )
            )
    for record in found:
        record["monitor_run"] = result.run_id  # the run (and its report) behind the alert
    return found


def _finish(
    conn: Any, the_lake: Lake, result: Assessment, settings: Settings, monitoring: MonitoringConfig
) -> dict[str, Any]:
    document = {**result.as_dict(), "finished_at": time.time()}
    directory = the_lake.root / "monitoring" / result.run_id
    report.write(document, directory)
    conn.set(keys.MONITOR_LATEST, json.dumps(document, default=float))
    alerts.publish(conn, result.alerts, monitoring.alerts, settings.alert_webhook_url)
    return {
        "status": result.status,
        "impressions": result.impressions,
        "alerts": [a["kind"] for a in result.alerts if a["severity"] == "alert"],
        "warnings": len([a for a in result.alerts if a["severity"] == "warning"]),
    }


# --------------------------------------------------------------------------- act


def act(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Start a retrain on an alert (once per cooldown), and decide a running A/B test."""
    settings, data, model, monitoring = _configs()
    conn = queue_redis(settings)
    the_lake = lake(settings)
    latest = json.loads(conn.get(keys.MONITOR_LATEST) or b"{}")
    outcome: dict[str, Any] = {}
    registry = _registry(settings, model)
    challenger = registry.by_alias(model.registry.challenger_alias)
    candidate = registry.by_alias(CANDIDATE)
    firing = (
        [a for a in latest.get("alerts", []) if a["severity"] == "alert"]
        if latest.get("run_id") == run_id
        else []
    )
    now = AcceleratedClock.shared(conn, data).now_ms()
    pending = json.loads(conn.get(keys.RETRAIN_PENDING) or b"null")
    if firing and challenger is None and candidate is None and pending is None:
        cooldown = int(monitoring.retrain.cooldown.total_seconds())
        if conn.set(keys.RETRAIN_COOLDOWN, run_id, nx=True, ex=cooldown):
            reason = "; ".join(f"{a['kind']}:{a['what']}" for a in firing)
            pending = {
                "reason": reason,
                "due_ms": now + duration_ms(monitoring.retrain.delay),
                "monitor_run": run_id,
            }
            conn.set(keys.RETRAIN_PENDING, json.dumps(pending))
            audit.record(
                conn, the_lake.root, "retrain_scheduled", reason=reason, due=iso(pending["due_ms"]),
                monitor_run=run_id,
            )  # fmt: skip
            outcome["retrain"] = "scheduled"
        else:
            outcome["retrain"] = "cooldown"
    if pending is not None:
        started = _start_due_retrain(conn, the_lake, pending, now, data, model, monitoring)
        if started != "waiting" or "retrain" not in outcome:  # keep "scheduled" on the alert's run
            outcome["retrain"] = started
    if challenger is not None:
        outcome["ab"] = decide_ab(conn, the_lake, registry, model, monitoring, challenger, data)
        conn.set(keys.MONITOR_AB, json.dumps({**outcome["ab"], "at": time.time()}, default=float))
    return outcome


def _start_due_retrain(
    conn: Any,
    the_lake: Lake,
    pending: dict[str, Any],
    now: int,
    data: DataConfig,
    model: ModelConfig,
    monitoring: MonitoringConfig,
) -> dict[str, str] | str:
    """Submit the retrain once its delay has passed (the world's new data is in the lake)."""
    if now < pending["due_ms"]:
        return "waiting"
    runs = submit_retrain(conn, data, model, monitoring, pending["reason"])
    if runs is None:
        return "busy"
    conn.delete(keys.RETRAIN_PENDING)
    audit.record(
        conn, the_lake.root, "retrain_triggered", reason=pending["reason"], runs=runs,
        monitor_run=pending["monitor_run"],
    )  # fmt: skip
    return runs


def ab_counts(the_lake: Lake, since_ms: int, until_ms: int) -> dict[tuple[str, int], tuple[int, int]]:
    """(impressions, clicks) per (variant, model version) of served slots in [since, until)."""
    served = the_lake.read_served(since_ms, until_ms)
    served = served.filter(pc.is_valid(served["model_version"]))
    if served.num_rows == 0:
        return {}
    events = the_lake.read_events(since_ms, until_ms + 3_600_000, ["event_type", "request_id", "position"])
    clicks = events.filter(pc.equal(events["event_type"], "click")).select(["request_id", "position"])
    clicks = clicks.append_column("clicked", pa.array(np.ones(clicks.num_rows, dtype=np.int8)))
    joined = served.join(clicks, keys=["request_id", "position"], join_type="left outer")
    clicked = pc.fill_null(joined["clicked"], 0).to_numpy()
    variants = joined["variant"].to_numpy(zero_copy_only=False)
    versions = joined["model_version"].to_numpy()
    counts: dict[tuple[str, int], tuple[int, int]] = {}
    for variant, version in set(zip(variants, versions, strict=True)):
        mask = (variants == variant) & (versions == version)
        counts[(str(variant), int(version))] = (int(mask.sum()), int(clicked[mask].sum()))
    return counts


def decide_ab(
    conn: Any,
    the_lake: Lake,
    registry: Registry,
    model: ModelConfig,
    monitoring: MonitoringConfig,
    challenger: VersionInfo,
    data: DataConfig,
) -> dict[str, Any]:
    """Two-proportion test on online CTR; promote, reject, or keep testing."""
    champion = registry.by_alias(model.registry.champion_alias)
    if champion is None:
        registry.promote(challenger.version)
        return {"decision": "promoted", "why": "no champion"}
    now = AcceleratedClock.shared(conn, data).now_ms()
    since = int(challenger.tags.get(CHALLENGER_SINCE, "0") or 0)
    until = now - int(monitoring.windows.label_delay.total_seconds() * 1000)
    counts = ab_counts(the_lake, since, until)
    control = counts.get(("champion", champion.version), (0, 0))
    treatment = counts.get(("challenger", challenger.version), (0, 0))
    test = two_proportion_test(control[1], control[0], treatment[1], treatment[0])
    figures = {
        "champion_version": champion.version,
        "challenger_version": challenger.version,
        "champion_impressions": control[0],
        "champion_clicks": control[1],
        "challenger_impressions": treatment[0],
        "challenger_clicks": treatment[1],
        "champion_ctr": test.control_rate,
        "challenger_ctr": test.treatment_rate,
        "lift": test.lift,
        "z": test.z,
        "p_value": test.p_value,
    }
    cfg = monitoring.ab
    if min(control[0], treatment[0]) < cfg.min_impressions:
        return {"decision": "collecting", **figures}
    if test.p_value < cfg.alpha:
        registry.promote(challenger.version)
        registry.client.set_model_version_tag(
            registry.name, str(challenger.version), "feedrank.ab_result", "won"
        )
        audit.record(conn, the_lake.root, "promoted", **figures, alpha=cfg.alpha)
        return {"decision": "promoted", **figures}
    if min(control[0], treatment[0]) >= cfg.max_impressions:
        registry.remove_alias(model.registry.challenger_alias)
        registry.client.set_model_version_tag(
            registry.name, str(challenger.version), "feedrank.ab_result", "lost"
        )
        audit.record(conn, the_lake.root, "challenger_rejected", **figures, alpha=cfg.alpha)
        return {"decision": "rejected", **figures}
    return {"decision": "collecting", **figures}


# --------------------------------------------------------------------------- gate


def _onnx_scores(
    registry: Registry, version: int, directory: Path, dense: np.ndarray, ids: dict[str, np.ndarray]
) -> np.ndarray:
    path = registry.download(version, directory / f"v{version}")
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"dense": np.ascontiguousarray(dense, dtype=np.float32), **{c: ids[c] for c in ID_COLUMNS}}
    (scores,) = session.run(["score"], feeds)
    return np.asarray(scores, dtype=np.float64)


def holdout_metrics(
    registry: Registry, version: int, table: pa.Table, dense_names: list[str], workdir: Path, k: int
) -> dict[str, float]:
    dense = np.column_stack([table[c].to_numpy().astype(np.float32) for c in dense_names])
    ids = {c: table[c].to_numpy().astype(np.int64) for c in ID_COLUMNS}
    labels = table["label"].to_numpy().astype(np.float64)
    requests = pc.dictionary_encode(table["request_id"]).combine_chunks().indices.to_numpy()
    served = _onnx_scores(registry, version, workdir, dense, ids)
    top = dense.copy()
    top[:, dense_names.index("position")] = 0
    ranking = _onnx_scores(registry, version, workdir, top, ids)
    return {
        "ndcg": ndcg_at_k(requests, labels, ranking, k),
        "auc": auc(labels, ranking),
        "log_loss": log_loss(labels, served),
    }


def gate(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Challenger against champion on the same fresh holdout; pass -> serve it to the A/B share."""
    settings, data, model, monitoring = _configs()
    conn = queue_redis(settings)
    the_lake = lake(settings)
    registry = _registry(settings, model)
    candidate = next(
        (v for v in registry.versions() if v.tags.get("feedrank.pipeline_run") == params["train_run"]), None
    )
    if candidate is None:
        raise PermanentStepError(f"no model version was registered by {params['train_run']}")
    champion = registry.by_alias(model.registry.champion_alias)
    if champion is None:
        registry.promote(candidate.version)
        registry.remove_alias(CANDIDATE)
        audit.record(
            conn, the_lake.root, "gate_passed", candidate_version=candidate.version, why="no champion"
        )
        return {"decision": "promoted", "version": candidate.version}
    dataset = the_lake.features_dir / candidate.tags["feature_version"] / candidate.tags["dataset_id"]
    manifest = json.loads((dataset / "manifest.json").read_text())
    holdout = pq.read_table(dataset / "test.parquet")
    k = model.evaluation.ndcg_k
    workdir = the_lake.root / "monitoring" / "gate" / run_id
    if champion.tags.get("feature_version") != candidate.tags.get("feature_version"):
        raise PermanentStepError(
            f"champion v{champion.version} and candidate v{candidate.version} use different feature "
            "versions; promote by hand after an offline comparison"
        )
    mine = holdout_metrics(registry, candidate.version, holdout, manifest["dense"], workdir, k)
    theirs = holdout_metrics(registry, champion.version, holdout, manifest["dense"], workdir, k)
    gate_cfg = monitoring.retrain.gate
    passed = (
        mine["ndcg"] >= theirs["ndcg"] + gate_cfg.ndcg_margin
        and mine["auc"] >= theirs["auc"] + gate_cfg.auc_margin
        and mine["log_loss"] <= theirs["log_loss"] + gate_cfg.log_loss_tolerance
    )
    figures = {
        "candidate_version": candidate.version,
        "champion_version": champion.version,
        "holdout": manifest["dataset_id"],
        "holdout_rows": holdout.num_rows,
        **{f"candidate_{k_}": v for k_, v in mine.items()},
        **{f"champion_{k_}": v for k_, v in theirs.items()},
    }
    registry.remove_alias(CANDIDATE)
    if passed:
        now = AcceleratedClock.shared(conn, data).now_ms()
        registry.set_alias(model.registry.challenger_alias, candidate.version)
        registry.client.set_model_version_tag(
            registry.name, str(candidate.version), CHALLENGER_SINCE, str(now)
        )
        audit.record(conn, the_lake.root, "gate_passed", **figures, margins=gate_cfg.model_dump())
    else:
        registry.client.set_model_version_tag(
            registry.name, str(candidate.version), "feedrank.gate", "failed"
        )
        audit.record(conn, the_lake.root, "gate_failed", **figures, margins=gate_cfg.model_dump())
    return {"decision": "challenger" if passed else "rejected", **figures}
