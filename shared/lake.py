"""The Parquet lake: layout, atomic writes and windowed reads.

    <root>/events/date=YYYY-MM-DD/hour=HH/part-<batch>.parquet    valid events
    <root>/catalog/date=YYYY-MM-DD/part-<batch>.parquet           item catalog (latest row per item wins)
    <root>/quarantine/<kind>/date=YYYY-MM-DD/part-<batch>.parquet rejected input with reasons
    <root>/served/date=YYYY-MM-DD/hour=HH/part-<entry>.parquet    the ranker's impression log
    <root>/features/<feature_version>/<dataset_id>/...            offline datasets (see feature service)
    <root>/monitoring/<run_id>/{serving.parquet,report.json,...}   one monitoring run's inputs and report
    <root>/monitoring/baselines/v<version>.parquet                 a model version's drift reference

Every file is written to a hidden temporary name and renamed into place, so a reader never sees a
half-written file; Arrow datasets skip names starting with '.' or '_'. A file name carries its
batch id, so a retried batch overwrites its own files instead of adding duplicates.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from shared.schemas import CATALOG_SCHEMA, EVENT_SCHEMA, QUARANTINE_SCHEMA, SERVED_SCHEMA
from shared.timeutil import DAY_MS, HOUR_MS, from_ms

_HIVE = ds.partitioning(pa.schema([("date", pa.string()), ("hour", pa.int32())]), flavor="hive")
_HIVE_DATE = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    """Write, flush to disk, then rename: the file appears complete or not at all, and once this
    returns it survives a crash of the process or the machine (what ingest acknowledges)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as sink:
            pq.write_table(table, sink, compression="zstd")
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(document: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def dataset_id(start_ms: int, end_ms: int) -> str:
    """An offline dataset's id is its window: whoever submits a run knows where it will write."""
    fmt = "%Y%m%dT%H%M%S"
    return f"{from_ms(start_ms):{fmt}}-{from_ms(end_ms):{fmt}}"


def _date(ms: int) -> str:
    return from_ms(ms).strftime("%Y-%m-%d")


def hour_partition(root: Path, hour_ms: int) -> Path:
    """The date=/hour= directory of one hour under a partitioned table's root."""
    hour = from_ms(hour_ms)
    return root / f"date={hour:%Y-%m-%d}" / f"hour={hour:%H}"


def _hour_files(root: Path, start_ms: int, end_ms: int) -> list[str]:
    """The published parquet files of the hour partitions overlapping [start, end): a reader of a
    few hours lists those directories only, not every file the table ever got (a live lake gains
    thousands of small files a day)."""
    files: list[str] = []
    for hour_ms in range(start_ms // HOUR_MS * HOUR_MS, max(end_ms, start_ms + 1), HOUR_MS):
        directory = hour_partition(root, hour_ms)
        if directory.is_dir():
            files += sorted(str(p) for p in directory.glob("*.parquet") if not p.name.startswith("."))
    return files


def split_by_period(table: pa.Table, ts_column: str, period_ms: int) -> Iterator[tuple[int, pa.Table]]:
    """Yield (period start ms, rows) for each period the table's timestamps fall in."""
    if table.num_rows == 0:
        return
    ts = table[ts_column].cast(pa.int64()).to_numpy()
    periods = ts // period_ms
    order = np.argsort(periods, kind="stable")
    sorted_periods = periods[order]
    bounds = np.flatnonzero(np.diff(sorted_periods)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [sorted_periods.size]])
    ordered = table.take(pa.array(order))
    for lo, hi in zip(starts, ends, strict=True):
        yield int(sorted_periods[lo]) * period_ms, ordered.slice(int(lo), int(hi - lo))


@dataclass(frozen=True)
class Lake:
    root: Path

    @property
    def events_dir(self) -> Path:
        return self.root / "events"

    @property
    def catalog_dir(self) -> Path:
        return self.root / "catalog"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def served_dir(self) -> Path:
        return self.root / "served"

    def quarantine_dir(self, kind: str) -> Path:
        return self.root / "quarantine" / kind

    @property
    def monitoring_dir(self) -> Path:
        return self.root / "monitoring"

    def monitoring_run_dir(self, run_id: str) -> Path:
        """What one monitoring run reads and writes: its serving window, report and charts."""
        return self.monitoring_dir / run_id

    def serving_window_path(self, run_id: str) -> Path:
        """Point-in-time features and labels of a run's serving window (feature step -> monitor)."""
        return self.monitoring_run_dir(run_id) / "serving.parquet"

    def baseline_path(self, version: int) -> Path:
        """A model version's drift reference: rows of its first settled serving window."""
        return self.monitoring_dir / "baselines" / f"v{version}.parquet"

    def baseline_requests_path(self, version: int) -> Path:
        """Requests collected for a version's quality baseline while it is being established."""
        return self.monitoring_dir / "baselines" / f"v{version}.requests.parquet"

    # ------------------------------------------------------------------ writes

    def events_file(self, batch_id: str, hour_ms: int) -> Path:
        """The one file of a batch's events of one hour."""
        return hour_partition(self.events_dir, hour_ms) / f"part-{batch_id}.parquet"

    def write_events(self, table: pa.Table, batch_id: str) -> list[Path]:
        """Partition by event hour; one file per (hour, batch)."""
        return [
            write_parquet_atomic(part.cast(EVENT_SCHEMA), self.events_file(batch_id, hour_ms))
            for hour_ms, part in split_by_period(table, "ts", HOUR_MS)
        ]

    def event_ids_in(self, batch_id: str, hour_ms: int) -> frozenset[str]:
        """Event ids a batch stored for one hour (empty when it wrote no file there)."""
        path = self.events_file(batch_id, hour_ms)
        if not path.exists():
            return frozenset()
        return frozenset(pq.read_table(path, columns=["event_id"])["event_id"].to_pylist())

    def write_served(self, table: pa.Table, name: str) -> list[Path]:
        """Served slots partitioned by serving hour; `name` (the first stream entry id) keeps replays
        from adding files."""
        paths = []
        for hour_ms, part in split_by_period(table, "ts", HOUR_MS):
            path = hour_partition(self.served_dir, hour_ms) / f"part-{name}.parquet"
            paths.append(write_parquet_atomic(part.cast(SERVED_SCHEMA), path))
        return paths

    def read_served(self, start_ms: int, end_ms: int) -> pa.Table:
        """Served slots with start <= ts < end, one row per (request_id, position) even after replays."""
        if not self.served_dir.exists():
            return SERVED_SCHEMA.empty_table()
        files = _hour_files(self.served_dir, start_ms, end_ms)
        if not files:
            return SERVED_SCHEMA.empty_table()
        ts_type = SERVED_SCHEMA.field("ts").type
        condition = (ds.field("ts") >= pa.scalar(start_ms, ts_type)) & (
            ds.field("ts") < pa.scalar(end_ms, ts_type)
        )
        table = ds.dataset(files, format="parquet", schema=SERVED_SCHEMA).to_table(filter=condition)
        if table.num_rows == 0:
            return table
        slot = pc.binary_join_element_wise(table["request_id"], pc.cast(table["position"], pa.string()), "#")
        _, first = np.unique(slot.to_numpy(zero_copy_only=False), return_index=True)
        return table.take(pa.array(np.sort(first)))

    def write_catalog(self, table: pa.Table, batch_id: str, received_ms: int) -> Path | None:
        if table.num_rows == 0:
            return None
        path = self.catalog_dir / f"date={_date(received_ms)}" / f"part-{batch_id}.parquet"
        stamped = table.cast(CATALOG_SCHEMA).append_column(
            "ingested_at", pa.array(np.full(table.num_rows, received_ms), pa.int64())
        )
        return write_parquet_atomic(stamped, path)

    def write_quarantine(
        self, kind: str, batch_id: str, received_ms: int, reasons: list[str], raw: list[str]
    ) -> Path | None:
        if not raw:
            return None
        table = pa.Table.from_arrays(
            [
                pa.array([batch_id] * len(raw)),
                pa.array([kind] * len(raw)),
                pa.array(np.full(len(raw), received_ms), pa.int64()).cast(
                    QUARANTINE_SCHEMA.field("received_at").type
                ),
                pa.array(reasons, pa.string()),
                pa.array(raw, pa.string()),
            ],
            schema=QUARANTINE_SCHEMA,
        )
        path = self.quarantine_dir(kind) / f"date={_date(received_ms)}" / f"part-{batch_id}.parquet"
        return write_parquet_atomic(table, path)

    # ------------------------------------------------------------------ reads

    def read_events(self, start_ms: int, end_ms: int, columns: list[str] | None = None) -> pa.Table:
        """Events with start <= ts < end, reading only the hour partitions of the range."""
        files = _hour_files(self.events_dir, start_ms, end_ms)
        if not files:
            return EVENT_SCHEMA.empty_table().select(columns or EVENT_SCHEMA.names)
        ts_type = EVENT_SCHEMA.field("ts").type
        condition = (ds.field("ts") >= pa.scalar(start_ms, ts_type)) & (
            ds.field("ts") < pa.scalar(end_ms, ts_type)
        )
        dataset = ds.dataset(files, format="parquet", schema=EVENT_SCHEMA)
        return dataset.to_table(columns=columns or EVENT_SCHEMA.names, filter=condition)

    def event_time_range(self) -> tuple[int, int] | None:
        """(min ts, max ts) over the lake, from partition names and file statistics."""
        if not self.events_dir.exists():
            return None
        dates = sorted(p.name.removeprefix("date=") for p in self.events_dir.glob("date=*"))
        if not dates:
            return None
        first = self.read_events(_day_ms(dates[0]), _day_ms(dates[0]) + DAY_MS, ["ts"])
        last = self.read_events(_day_ms(dates[-1]), _day_ms(dates[-1]) + DAY_MS, ["ts"])
        if first.num_rows == 0 or last.num_rows == 0:
            return None
        low = pc.min(first["ts"]).cast(pa.int64()).as_py()
        high = pc.max(last["ts"]).cast(pa.int64()).as_py()
        return int(low), int(high)

    def read_catalog(self) -> pa.Table:
        """The latest catalog row of every item."""
        if not self.catalog_dir.exists():
            return CATALOG_SCHEMA.empty_table()
        schema = CATALOG_SCHEMA.append(pa.field("ingested_at", pa.int64())).append(
            pa.field("date", pa.string())
        )
        table = ds.dataset(
            self.catalog_dir, format="parquet", partitioning=_HIVE_DATE, schema=schema
        ).to_table()
        if table.num_rows == 0:
            return CATALOG_SCHEMA.empty_table()
        order = pc.sort_indices(table, [("item_id", "ascending"), ("ingested_at", "descending")])
        table = table.take(order)
        item_ids = table["item_id"].to_numpy()
        first = np.concatenate([[True], item_ids[1:] != item_ids[:-1]])
        return table.filter(pa.array(first)).select(CATALOG_SCHEMA.names).cast(CATALOG_SCHEMA)

    def read_quarantine(self, kind: str) -> pa.Table:
        directory = self.quarantine_dir(kind)
        if not directory.exists():
            return QUARANTINE_SCHEMA.empty_table()
        schema = QUARANTINE_SCHEMA.append(pa.field("date", pa.string()))
        table = ds.dataset(directory, format="parquet", partitioning=_HIVE_DATE, schema=schema).to_table()
        return table.select(QUARANTINE_SCHEMA.names)


def _day_ms(date: str) -> int:
    return int(np.datetime64(date, "ms").astype(np.int64))
