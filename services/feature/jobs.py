"""The feature service's pipeline steps. Each is idempotent: a rerun for the same window rewrites
the same files (atomically) and the same snapshot id, so retries never duplicate anything."""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import structlog

from services.feature.compute import snapshot_rows
from services.feature.datasets import (
    DatasetWindow,
    FeatureValidationError,
    build_examples,
    dataset_dir,
    read_examples,
    split_by_time,
    validate_examples,
    write_splits,
)
from shared.config import DataConfig
from shared.connections import feature_store, lake
from shared.features import FeatureSpec
from shared.lake import Lake, write_parquet_atomic
from shared.pipeline import PermanentStepError
from shared.schemas import EventType
from shared.settings import get_settings
from shared.timeutil import from_ms, iso

log = structlog.get_logger(__name__)


def _context(params: dict[str, Any]) -> tuple[DataConfig, Lake, FeatureSpec, DatasetWindow]:
    settings = get_settings()
    config = settings.data_config()
    window = DatasetWindow.from_config(config, params["start_ms"], params["end_ms"])
    return config, lake(settings), FeatureSpec.from_config(config), window


def validate_window(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """etl step 2: is there enough clean raw data in the window to build features from?"""
    config, the_lake, _, window = _context(params)
    events = the_lake.read_events(window.history_start_ms, window.end_ms, ["event_type", "ts"])
    impressions = events.filter(
        pc.and_(
            pc.equal(events["event_type"], EventType.IMPRESSION.value),
            pc.greater_equal(events["ts"].cast(pa.int64()), window.start_ms),
        )
    ).num_rows
    quarantined = _quarantined_between(the_lake, window.history_start_ms, window.end_ms)
    share = quarantined / max(quarantined + events.num_rows, 1)
    figures = {
        "window": f"{iso(window.start_ms)} .. {iso(window.end_ms)}",
        "history_events": events.num_rows,
        "impressions": impressions,
        "quarantined": quarantined,
        "quarantine_share": round(share, 6),
    }
    problems = []
    if impressions < config.dataset.min_rows:
        problems.append(f"{impressions} impressions in the window, fewer than dataset.min_rows")
    if share > config.validation.max_quarantine_share:
        problems.append(f"quarantine share {share:.2%} above validation.max_quarantine_share")
    if problems:
        raise PermanentStepError("raw window rejected: " + "; ".join(problems) + f" ({figures})")
    return figures


def _quarantined_between(the_lake: Lake, start_ms: int, end_ms: int) -> int:
    directory = the_lake.quarantine_dir("events")
    if not directory.exists():
        return 0
    dates = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")
    dataset = ds.dataset(directory, format="parquet", partitioning=dates)
    condition = (ds.field("date") >= f"{from_ms(start_ms):%Y-%m-%d}") & (
        ds.field("date") <= f"{from_ms(end_ms):%Y-%m-%d}"
    )
    return int(dataset.count_rows(filter=condition))


def build_features(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """etl step 3: point-in-time features and labels for every impression in the window."""
    config, the_lake, spec, window = _context(params)
    events = the_lake.read_events(window.history_start_ms, window.end_ms)
    catalog = the_lake.read_catalog()
    table, stats = build_examples(events, catalog, spec, window)
    try:
        checks = validate_examples(table, spec, stats, config)
    except FeatureValidationError as exc:
        raise PermanentStepError(str(exc)) from exc
    directory = dataset_dir(the_lake, spec.version, window.dataset_id)
    write_parquet_atomic(table, directory / "examples.parquet")
    return {
        "dataset_id": window.dataset_id,
        "feature_version": spec.version,
        "history_events": stats.history_events,
        "orphan_clicks": stats.orphan_clicks,
        **checks,
    }


def split_dataset(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """etl step 4: train / validation / test by time, plus the manifest the trainer reads."""
    config, the_lake, spec, window = _context(params)
    directory = dataset_dir(the_lake, spec.version, window.dataset_id)
    if not (directory / "examples.parquet").exists():
        raise PermanentStepError(f"no examples at {directory}: run the features step first")
    table = read_examples(directory)
    manifest = {
        "dataset_id": window.dataset_id,
        **spec.describe(),
        "run_id": run_id,
        "window": {
            "start": iso(window.start_ms),
            "end": iso(window.end_ms),
            "examples_end": iso(window.examples_end_ms),
            "history_start": iso(window.history_start_ms),
        },
        "label_rate": round(float(pc.mean(table["label"]).as_py()), 6),
        "rows": table.num_rows,
        "source": params["source"],
        "profile": get_settings().profile,
        "seed": config.seed,
    }
    try:
        splits = split_by_time(table, window, config, params.get("validation_ms"), params.get("test_ms"))
        written = write_splits(directory, splits, manifest)
    except FeatureValidationError as exc:
        raise PermanentStepError(str(exc)) from exc
    _point_latest(the_lake, spec.version, window.dataset_id)
    return {"dataset_id": window.dataset_id, **{k: v["rows"] for k, v in written["splits"].items()}}


def _point_latest(the_lake: Lake, feature_version: str, dataset_id: str) -> None:
    latest = the_lake.features_dir / feature_version / "LATEST"
    tmp = latest.with_name(".LATEST.tmp")
    tmp.write_text(dataset_id)
    os.replace(tmp, latest)


def materialize(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """etl step 5: the online store as of the window's end, through the same counters as training."""
    settings = get_settings()
    _, the_lake, spec, window = _context(params)
    as_of = window.end_ms
    events = the_lake.read_events(as_of - window.lookback_ms, as_of)
    catalog = the_lake.read_catalog()
    catalog = catalog.filter(pc.less_equal(catalog["published_at"].cast(pa.int64()), as_of))
    if catalog.num_rows == 0:
        raise PermanentStepError("the catalog is empty: nothing to materialize")
    users, user_rows, items, item_rows = snapshot_rows(spec, events, catalog, as_of)
    snapshot = feature_store(settings).publish(spec, as_of, users, user_rows, items, item_rows)
    return {
        "feature_version": snapshot.feature_version,
        "snapshot_id": snapshot.snapshot_id,
        "as_of": iso(as_of),
        "users": snapshot.users,
        "items": snapshot.items,
    }


def build_serving_window(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """monitor step 1: point-in-time features and (delayed) labels of the recently served impressions,
    built by the same code as the training sets so that the monitor compares like with like."""
    settings = get_settings()
    config = settings.data_config()
    the_lake = lake(settings)
    spec = FeatureSpec.from_config(config)
    lookback = DatasetWindow.from_config(config, params["start_ms"], params["end_ms"]).lookback_ms
    window = DatasetWindow(params["start_ms"], params["end_ms"], lookback, params["label_delay_ms"])
    events = the_lake.read_events(window.history_start_ms, window.end_ms)
    table, stats = build_examples(events, the_lake.read_catalog(), spec, window)
    path = write_parquet_atomic(table, the_lake.serving_window_path(run_id))
    return {
        "rows": table.num_rows,
        "window": f"{iso(window.start_ms)} .. {iso(window.examples_end_ms)}",
        "unknown_item_impressions": stats.unknown_item_impressions,
        "path": str(path),
    }
