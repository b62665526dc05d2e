"""The lake: hour partitions, atomic files, windowed reads, latest catalog row wins."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from shared.lake import Lake, write_parquet_atomic
from shared.schemas import CATALOG_SCHEMA, EVENT_SCHEMA
from shared.timeutil import HOUR_MS

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def events(ts: list[int], prefix: str = "e") -> pa.Table:
    n = len(ts)
    return pa.Table.from_pydict(
        {
            "event_id": [f"{prefix}{i}" for i in range(n)], "event_type": ["impression"] * n, "user_id": [1] * n,
            "item_id": [2] * n, "request_id": ["r"] * n, "position": list(range(n)), "ts": ts, "dwell_ms": [None] * n,
        },
        schema=EVENT_SCHEMA,
    )  # fmt: skip


def test_events_are_partitioned_by_date_and_hour(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    paths = lake.write_events(events([T0, T0 + 10, T0 + HOUR_MS, T0 + 25 * HOUR_MS]), "b1")
    relative = sorted(str(p.relative_to(lake.events_dir)) for p in paths)
    assert relative == [
        "date=2026-01-01/hour=00/part-b1.parquet",
        "date=2026-01-01/hour=01/part-b1.parquet",
        "date=2026-01-02/hour=01/part-b1.parquet",
    ]


def test_read_window_is_half_open(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    lake.write_events(events([T0, T0 + HOUR_MS - 1, T0 + HOUR_MS, T0 + 30 * HOUR_MS]), "b1")
    got = lake.read_events(T0, T0 + HOUR_MS)
    assert sorted(got["event_id"].to_pylist()) == ["e0", "e1"]
    assert lake.read_events(T0, T0 + 31 * HOUR_MS).num_rows == 4
    assert lake.event_time_range() == (T0, T0 + 30 * HOUR_MS)


def test_rewriting_a_batch_replaces_its_files(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    lake.write_events(events([T0, T0 + 1]), "b1")
    lake.write_events(events([T0, T0 + 1]), "b1")
    assert lake.read_events(T0, T0 + HOUR_MS).num_rows == 2


def test_empty_lake_reads_empty(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    assert lake.read_events(T0, T0 + HOUR_MS).num_rows == 0
    assert lake.read_catalog().num_rows == 0
    assert lake.event_time_range() is None


def test_a_write_that_dies_halfway_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_half_then_die(table: pa.Table, where: BinaryIO, **_: object) -> None:
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_half_then_die)
    target = tmp_path / "date=2026-01-01" / "part-b1.parquet"
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(events([T0]), target)
    assert list(target.parent.iterdir()) == []


def test_no_temporary_files_remain(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    lake.write_events(events([T0]), "b1")
    assert [p.name for p in lake.events_dir.rglob(".*")] == []


def test_latest_catalog_row_wins(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    first = pa.Table.from_pydict(
        {"item_id": [1, 2], "creator_id": [10, 20], "topic_id": [0, 1], "published_at": [T0, T0]},
        schema=CATALOG_SCHEMA,
    )
    update = pa.Table.from_pydict(
        {"item_id": [2], "creator_id": [21], "topic_id": [3], "published_at": [T0]}, schema=CATALOG_SCHEMA
    )
    lake.write_catalog(first, "c1", T0)
    lake.write_catalog(update, "c2", T0 + 1)
    catalog = lake.read_catalog()
    row = catalog.filter(pc.equal(catalog["item_id"], 2)).to_pylist()[0]
    assert (row["creator_id"], row["topic_id"]) == (21, 3)
    assert catalog.num_rows == 2
