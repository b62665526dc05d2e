"""Loading the feature service's datasets, with the checks that keep bad input from being trained on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.features import ID_COLUMNS

SPLITS = ("train", "validation", "test")


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message says why."""


@dataclass(frozen=True)
class Split:
    """One split as arrays, aligned by row."""

    dense: np.ndarray  # float32 [n, n_dense]
    ids: dict[str, np.ndarray]  # int64 [n] per id column
    labels: np.ndarray  # float32 [n]
    requests: np.ndarray  # int64 [n] request codes (for per-request metrics)
    ts: np.ndarray  # int64 [n] ms
    position: np.ndarray  # int64 [n] served position

    def __len__(self) -> int:
        return int(self.labels.size)

    def take(self, rows: np.ndarray) -> Split:
        return Split(
            self.dense[rows],
            {c: v[rows] for c, v in self.ids.items()},
            self.labels[rows],
            self.requests[rows],
            self.ts[rows],
            self.position[rows],
        )

    def with_position(self, position: int, position_column: int) -> np.ndarray:
        """Dense features as if every row had been shown at `position` (position-free ranking)."""
        dense = self.dense.copy()
        dense[:, position_column] = position
        return dense


@dataclass(frozen=True)
class Dataset:
    directory: Path
    manifest: dict[str, Any]

    @property
    def feature_version(self) -> str:
        return str(self.manifest["feature_version"])

    @property
    def dense_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["dense"])

    def load(self, split: str) -> Split:
        table = pq.read_table(self.directory / f"{split}.parquet")
        return to_split(table, self.dense_names)


def to_split(table: pa.Table, dense_names: tuple[str, ...]) -> Split:
    missing = [
        c
        for c in (*dense_names, *ID_COLUMNS, "label", "request_id", "ts", "position")
        if c not in table.column_names
    ]
    if missing:
        raise DatasetError(f"columns missing: {', '.join(missing)}")
    dense = np.column_stack([table[c].to_numpy().astype(np.float32) for c in dense_names])
    return Split(
        dense=np.ascontiguousarray(dense),
        ids={c: table[c].to_numpy().astype(np.int64) for c in ID_COLUMNS},
        labels=table["label"].to_numpy().astype(np.float32),
        requests=pc.dictionary_encode(table["request_id"])
        .combine_chunks()
        .indices.to_numpy()
        .astype(np.int64),
        ts=table["ts"].to_numpy().astype(np.int64),
        position=table["position"].to_numpy().astype(np.int64),
    )


def resolve_dataset(features_dir: Path, feature_version: str, dataset_id: str | None) -> Dataset:
    """The named dataset (or the newest for this feature version), checked before any training."""
    version_dir = features_dir / feature_version
    if dataset_id is None:
        latest = version_dir / "LATEST"
        if not latest.exists():
            present = features_dir.glob("*") if features_dir.exists() else []
            available = sorted(p.name for p in present if p.is_dir())
            raise DatasetError(
                f"no dataset for feature version {feature_version} under {features_dir} "
                f"(versions present: {', '.join(available) or 'none'}); run the etl pipeline first"
            )
        dataset_id = latest.read_text().strip()
    directory = version_dir / dataset_id
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise DatasetError(f"no manifest at {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("feature_version") != feature_version:
        raise DatasetError(
            f"feature version mismatch: dataset {dataset_id} was built with "
            f"{manifest.get('feature_version')}, the current feature definitions are {feature_version}"
        )
    return Dataset(directory, manifest)


def check_dataset(dataset: Dataset) -> dict[str, int]:
    """Every split present, non-empty, finite, with both classes in training. Returns row counts."""
    rows: dict[str, int] = {}
    problems: list[str] = []
    for split in SPLITS:
        path = dataset.directory / f"{split}.parquet"
        if not path.exists():
            problems.append(f"{split} split missing ({path})")
            continue
        table = pq.read_table(path)
        rows[split] = table.num_rows
        if table.num_rows == 0:
            problems.append(f"{split} split is empty")
            continue
        for name in dataset.dense_names:
            if name not in table.column_names:
                problems.append(f"{split}: column {name} missing")
                continue
            values = table[name].to_numpy()
            if not np.isfinite(values).all():
                problems.append(f"{split}: {name} has NaN or infinite values")
        if split == "train" and not 0 < pc.sum(table["label"]).as_py() < table.num_rows:
            problems.append("train split has a single class")
    if problems:
        raise DatasetError("dataset rejected: " + "; ".join(problems))
    return rows
