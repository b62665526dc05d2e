"""Offline datasets: labelled, point-in-time examples, split by time, with a manifest and checks.

    <lake>/features/<feature_version>/<dataset_id>/examples.parquet      every example of the window
    <lake>/features/<feature_version>/<dataset_id>/{train,validation,test}.parquet
    <lake>/features/<feature_version>/<dataset_id>/manifest.json
    <lake>/features/<feature_version>/LATEST                             id of the newest dataset

An example is one impression at time t with its label (clicked within `label_window`). Examples
stop `label_window` before the watermark so that every label is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.feature.compute import TYPE_CODE, Counters, EventLog, event_log
from shared.config import DataConfig
from shared.features import FeatureSpec
from shared.lake import Lake, dataset_id, write_json_atomic, write_parquet_atomic
from shared.schemas import EventType
from shared.timeutil import duration_ms, iso

SPLITS = ("train", "validation", "test")


class FeatureValidationError(ValueError):
    """The feature set is not fit to train on; the message lists every failed check."""


@dataclass(frozen=True)
class DatasetWindow:
    """Examples from [start, end - label_window); history from start - lookback."""

    start_ms: int
    end_ms: int
    lookback_ms: int
    label_window_ms: int

    @classmethod
    def from_config(cls, config: DataConfig, start_ms: int, end_ms: int) -> DatasetWindow:
        f = config.features
        lookback = max(duration_ms(w) for w in [*f.windows, f.long_window])
        return cls(start_ms, end_ms, lookback, duration_ms(f.label_window))

    @property
    def history_start_ms(self) -> int:
        return self.start_ms - self.lookback_ms

    @property
    def examples_end_ms(self) -> int:
        return self.end_ms - self.label_window_ms

    @property
    def dataset_id(self) -> str:
        return dataset_id(self.start_ms, self.end_ms)


def dataset_dir(lake: Lake, feature_version: str, dataset_id: str) -> Path:
    return lake.features_dir / feature_version / dataset_id


@dataclass
class BuildStats:
    impressions_in_window: int = 0
    unknown_item_impressions: int = 0
    clicks_in_window: int = 0
    orphan_clicks: int = 0
    history_events: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _match_slots(log: EventLog, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For each `target` event, the index of a `source` event on the same slot (request, position), or -1."""
    slot_span = int(log.position.max()) + 1 if log.position.size else 1
    src_keys = log.request[source] * slot_span + log.position[source]
    order = np.argsort(src_keys, kind="stable")
    sorted_keys = src_keys[order]
    tgt_keys = log.request[target] * slot_span + log.position[target]
    pos = np.searchsorted(sorted_keys, tgt_keys)
    hit = pos < sorted_keys.size
    hit[hit] &= sorted_keys[pos[hit]] == tgt_keys[hit]
    match = np.full(target.size, -1, dtype=np.int64)
    match[hit] = source[order[pos[hit]]]
    return match


def _follow_ups(log: EventLog, kind: EventType, impressions: np.ndarray, max_delay_ms: int) -> np.ndarray:
    """For each impression, its `kind` event (click, like, hide) within max_delay_ms, or -1."""
    match = _match_slots(log, np.flatnonzero(log.event_type == TYPE_CODE[kind]), impressions)
    delay = np.where(match >= 0, log.ts[np.maximum(match, 0)] - log.ts[impressions], 0)
    match[(delay < 0) | (delay > max_delay_ms)] = -1
    return match


def build_examples(
    events: pa.Table, catalog: pa.Table, spec: FeatureSpec, window: DatasetWindow
) -> tuple[pa.Table, BuildStats]:
    """Labelled examples with point-in-time features, from the events of [history_start, end)."""
    log = event_log(events, catalog)
    stats = BuildStats(history_events=events.num_rows)
    in_window = (log.ts >= window.start_ms) & (log.ts < window.examples_end_ms)
    imp = log.event_type == TYPE_CODE[EventType.IMPRESSION]
    click = np.flatnonzero(log.event_type == TYPE_CODE[EventType.CLICK])
    examples = np.flatnonzero(imp & in_window)
    stats.impressions_in_window = int(examples.size)
    known = log.creator[examples] >= 0
    stats.unknown_item_impressions = int((~known).sum())
    examples = examples[known]

    window_clicks = click[(log.ts[click] >= window.start_ms) & (log.ts[click] < window.end_ms)]
    impressions = np.flatnonzero(imp)
    stats.clicks_in_window = int(window_clicks.size)
    stats.orphan_clicks = int((_match_slots(log, impressions, window_clicks) < 0).sum())

    label_ms = window.label_window_ms
    click_of = _follow_ups(log, EventType.CLICK, examples, label_ms)
    like_of = _follow_ups(log, EventType.LIKE, examples, 2 * label_ms)
    hide_of = _follow_ups(log, EventType.HIDE, examples, label_ms)

    users, items = log.user[examples], log.item[examples]
    creators, topics, ts = log.creator[examples], log.topic[examples], log.ts[examples]
    counters = Counters(spec, log)
    raw = counters.for_examples(users, items, creators, topics, ts)
    published = _published_ms(catalog, items)
    raw["age_ms"] = ts - published
    raw["position"] = log.position[examples]
    dense = spec.dense_matrix(raw)

    columns: dict[str, pa.Array] = {
        "request_id": pc.take(log.request_ids, pa.array(log.request[examples])),
        "ts": pa.array(ts, pa.int64()),
        "user_id": pa.array(users),
        "item_id": pa.array(items),
        "creator_id": pa.array(creators),
        "topic_id": pa.array(topics),
        "position": pa.array(log.position[examples].astype(np.int32)),
        "label": pa.array((click_of >= 0).astype(np.int8)),
        "like": pa.array((like_of >= 0).astype(np.int8)),
        "hide": pa.array((hide_of >= 0).astype(np.int8)),
        "dwell_ms": pa.array(np.where(click_of >= 0, log.dwell_ms[np.maximum(click_of, 0)], 0)),
    }
    for j, name in enumerate(spec.dense_names):
        columns[name] = pa.array(dense[:, j])
    table = pa.table(columns)
    order = pc.sort_indices(
        table, [("ts", "ascending"), ("request_id", "ascending"), ("position", "ascending")]
    )
    return table.take(order), stats


def _published_ms(catalog: pa.Table, items: np.ndarray) -> np.ndarray:
    ids = catalog["item_id"].to_numpy()
    order = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids[order], items), 0, max(ids.size - 1, 0))
    return np.asarray(catalog["published_at"].cast(pa.int64()).to_numpy()[order][pos])


# --------------------------------------------------------------------------- checks


def validate_examples(
    table: pa.Table, spec: FeatureSpec, stats: BuildStats, config: DataConfig
) -> dict[str, Any]:
    """Every check runs; all failures are reported together. Returns the figures checked."""
    problems: list[str] = []
    ds_cfg = config.dataset
    rows = table.num_rows
    expected = stats.impressions_in_window - stats.unknown_item_impressions
    if rows != expected:
        problems.append(f"row count {rows} != impressions in window {expected} (raw data disagrees)")
    if rows < ds_cfg.min_rows:
        problems.append(f"only {rows} examples, fewer than dataset.min_rows={ds_cfg.min_rows}")
    unknown_share = stats.unknown_item_impressions / max(stats.impressions_in_window, 1)
    if unknown_share > config.validation.max_quarantine_share:
        problems.append(f"{unknown_share:.2%} of impressions name items missing from the catalog")
    orphan_share = stats.orphan_clicks / max(stats.clicks_in_window, 1)
    if orphan_share > ds_cfg.max_orphan_click_share:
        problems.append(
            f"{orphan_share:.2%} of clicks match no impression (max {ds_cfg.max_orphan_click_share:.2%})"
        )
    label_rate = float(pc.mean(table["label"]).as_py() or 0.0) if rows else 0.0
    if rows and not ds_cfg.label_rate_min <= label_rate <= ds_cfg.label_rate_max:
        problems.append(
            f"label rate {label_rate:.4f} outside [{ds_cfg.label_rate_min}, {ds_cfg.label_rate_max}]"
        )
    for column in ("user_id", "item_id", "creator_id", "topic_id", "position"):
        if rows and pc.min(table[column]).as_py() < 0:
            problems.append(f"{column} has negative values")
    for name, (low, high) in spec.expected_ranges().items():
        values = table[name].to_numpy()
        if not np.isfinite(values).all():
            problems.append(f"{name} has NaN or infinite values")
            continue
        if rows and (values.min() < low - 1e-6 or values.max() > high + 1e-6):
            problems.append(f"{name} outside [{low}, {high}]: [{values.min():.4g}, {values.max():.4g}]")
    if problems:
        raise FeatureValidationError("feature set rejected:\n  - " + "\n  - ".join(problems))
    return {
        "rows": rows,
        "label_rate": round(label_rate, 6),
        "unknown_item_share": round(unknown_share, 6),
        "orphan_click_share": round(orphan_share, 6),
    }


# --------------------------------------------------------------------------- split


def split_by_time(
    table: pa.Table,
    window: DatasetWindow,
    config: DataConfig,
    validation_ms: int | None = None,
    test_ms: int | None = None,
) -> dict[str, pa.Table]:
    """Train, then validation, then test, each a later slice of time; requests never straddle.

    The slice lengths default to dataset.validation and dataset.test; a run may set its own (a
    retrain on a short recent window needs short slices)."""
    test_start = window.examples_end_ms - (test_ms or duration_ms(config.dataset.test))  # labelled rows only
    val_start = test_start - (validation_ms or duration_ms(config.dataset.validation))
    ts = table["ts"]
    return {
        "train": table.filter(pc.less(ts, val_start)),
        "validation": table.filter(pc.and_(pc.greater_equal(ts, val_start), pc.less(ts, test_start))),
        "test": table.filter(pc.greater_equal(ts, test_start)),
    }


def split_summary(table: pa.Table) -> dict[str, Any]:
    if table.num_rows == 0:
        return {"rows": 0, "requests": 0, "label_rate": None, "start": None, "end": None}
    return {
        "rows": table.num_rows,
        "requests": pc.count_distinct(table["request_id"]).as_py(),
        "users": pc.count_distinct(table["user_id"]).as_py(),
        "items": pc.count_distinct(table["item_id"]).as_py(),
        "label_rate": round(float(pc.mean(table["label"]).as_py()), 6),
        "start": iso(int(pc.min(table["ts"]).as_py())),
        "end": iso(int(pc.max(table["ts"]).as_py())),
    }


def write_splits(directory: Path, splits: dict[str, pa.Table], manifest: dict[str, Any]) -> dict[str, Any]:
    empty = [name for name, part in splits.items() if part.num_rows == 0]
    if empty:
        raise FeatureValidationError(
            f"empty split(s): {', '.join(empty)}; widen dataset.span or shrink val/test"
        )
    manifest = dict(manifest)
    manifest["splits"] = {}
    for name, part in splits.items():
        path = write_parquet_atomic(part, directory / f"{name}.parquet")
        manifest["splits"][name] = {**split_summary(part), "file": path.name, "bytes": path.stat().st_size}
    write_json_atomic(manifest, directory / "manifest.json")
    return manifest


def read_examples(directory: Path) -> pa.Table:
    return pq.read_table(directory / "examples.parquet")
