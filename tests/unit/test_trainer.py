"""The trainer in-process on a tiny simulated dataset: it learns, it is deterministic, unknown ids
do not crash it, and ONNX scores equal torch scores (or registration is refused)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pytest
import torch
from onnx import numpy_helper

from services.feature.datasets import DatasetWindow, build_examples, split_by_time, write_splits
from services.trainer.data import Dataset, DatasetError, Split, check_dataset, resolve_dataset
from services.trainer.evaluate import evaluate
from services.trainer.export import ParityError, contract, export_onnx, parity_check
from services.trainer.model import IdLookup, build_vocabulary
from services.trainer.training import (
    load_checkpoint,
    predict,
    recency_weights,
    save_checkpoint,
    train_model,
)
from shared.config import DataConfig, ModelConfig, load_config
from shared.evaluation import auc
from shared.features import FeatureSpec
from shared.schemas import CATALOG_SCHEMA
from shared.settings import REPO_CONFIG_DIR
from shared.timeutil import to_ms
from shared.world import SessionSimulator, World


def model_config(**overrides: object) -> ModelConfig:
    return load_config(ModelConfig, REPO_CONFIG_DIR / "model.yaml", "tiny", overrides)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    config = load_config(DataConfig, REPO_CONFIG_DIR / "data.yaml", "tiny")
    world = World.create(config)
    end = config.live_start
    events = pa.concat_tables([c.events for c in SessionSimulator(world).run(config.world.start, end)])
    catalog = pa.table(world.catalog_until(end)).cast(CATALOG_SCHEMA)
    spec = FeatureSpec.from_config(config)
    window = DatasetWindow.from_config(config, to_ms(end) - 3 * 86_400_000, to_ms(end))
    examples, _ = build_examples(events, catalog, spec, window)
    directory = tmp_path_factory.mktemp("features") / spec.version / window.dataset_id
    manifest = write_splits(
        directory,
        split_by_time(examples, window, config),
        {**spec.describe(), "dataset_id": window.dataset_id},
    )
    return Dataset(directory, manifest)


@pytest.fixture(scope="module")
def splits(dataset: Dataset) -> dict[str, Split]:
    return {name: dataset.load(name) for name in ("train", "validation", "test")}


def test_vocabulary_keeps_frequent_ids_and_reserves_unknown() -> None:
    table = build_vocabulary(np.array([5, 5, 7, 9, 9, 9, -1]), min_count=2)
    assert table[5] > 0
    assert table[9] > 0
    assert table[7] == 0
    assert sorted({int(table[5]), int(table[9])}) == [1, 2]


def test_unknown_ids_map_to_the_unknown_row() -> None:
    lookup = IdLookup(build_vocabulary(np.array([1, 1, 2, 2]), 1))
    rows = lookup(torch.tensor([1, 2, 3, -7, 10**15]))
    assert rows.tolist() == [1, 2, 0, 0, 0]


def test_a_tiny_run_learns(dataset: Dataset, splits: dict[str, Split]) -> None:
    result = train_model(model_config(), dataset.dense_names, splits["train"], splits["validation"])
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    test = splits["test"]
    assert auc(test.labels, predict(result.model, test.dense, test.ids)) > 0.6


def test_training_is_deterministic_for_a_seed(dataset: Dataset, splits: dict[str, Split]) -> None:
    cfg = model_config(training={"max_epochs": 1})
    first = train_model(cfg, dataset.dense_names, splits["train"], splits["validation"])
    second = train_model(cfg, dataset.dense_names, splits["train"], splits["validation"])
    test = splits["test"]
    np.testing.assert_array_equal(
        predict(first.model, test.dense, test.ids), predict(second.model, test.dense, test.ids)
    )


@pytest.mark.parametrize("architecture", ["dlrm", "two_tower"])
def test_both_architectures_export_with_parity(
    architecture: str, dataset: Dataset, splits: dict[str, Split], tmp_path: Path
) -> None:
    cfg = model_config(architecture=architecture, training={"max_epochs": 1})
    result = train_model(cfg, dataset.dense_names, splits["train"], splits["validation"])
    path = export_onnx(result.model, tmp_path / "model.onnx", len(dataset.dense_names), cfg.export.opset)
    assert parity_check(result.model, path, splits["test"], 1000, 1e-4) < 1e-4


def test_a_model_that_drifts_from_torch_fails_parity(
    dataset: Dataset, splits: dict[str, Split], tmp_path: Path
) -> None:
    cfg = model_config(training={"max_epochs": 1})
    result = train_model(cfg, dataset.dense_names, splits["train"], splits["validation"])
    path = export_onnx(result.model, tmp_path / "model.onnx", len(dataset.dense_names), cfg.export.opset)
    graph = onnx.load(str(path))
    weights = next(
        w
        for w in graph.graph.initializer
        if numpy_helper.to_array(w).dtype == np.float32 and numpy_helper.to_array(w).size > 100
    )
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 1.5, weights.name))
    onnx.save(graph, str(path))
    with pytest.raises(ParityError, match="parity failed"):
        parity_check(result.model, path, splits["test"], 1000, 1e-4)


def test_checkpoints_round_trip(dataset: Dataset, splits: dict[str, Split], tmp_path: Path) -> None:
    result = train_model(
        model_config(training={"max_epochs": 1}), dataset.dense_names, splits["train"], splits["validation"]
    )
    save_checkpoint(result, tmp_path / "model.pt")
    restored, spec = load_checkpoint(tmp_path / "model.pt")
    test = splits["test"]
    np.testing.assert_array_equal(
        predict(result.model, test.dense, test.ids), predict(restored, test.dense, test.ids)
    )
    assert spec.dense_names == dataset.dense_names


def test_contract_names_every_input(dataset: Dataset) -> None:
    described = contract(dataset.dense_names, dataset.feature_version, "dlrm")
    assert [i["name"] for i in described["inputs"]] == [
        "dense",
        "user_id",
        "item_id",
        "creator_id",
        "topic_id",
    ]
    assert described["inputs"][0]["shape"] == ["batch", len(dataset.dense_names)]
    assert described["inputs"][0]["columns"][described["position_column"]] == "position"


def test_evaluation_places_the_model_between_baseline_and_oracle(
    dataset: Dataset, splits: dict[str, Split]
) -> None:
    data = load_config(DataConfig, REPO_CONFIG_DIR / "data.yaml", "tiny")
    cfg = model_config()
    result = train_model(cfg, dataset.dense_names, splits["train"], splits["validation"])
    report = evaluate(
        result.model,
        splits["test"],
        dataset.dense_names,
        FeatureSpec.from_config(data),
        World.create(data),
        cfg,
    )
    assert report.metrics["oracle"]["auc"] > report.metrics["popularity"]["auc"]
    assert report.metrics["oracle"]["log_loss"] < report.metrics["model"]["log_loss"]
    assert set(report.lift) == {"auc", "ndcg_at_10"}
    assert "test_model_ece" in report.flat()


def test_missing_datasets_are_named(dataset: Dataset, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="run the etl pipeline first"):
        resolve_dataset(tmp_path, dataset.feature_version, None)
    with pytest.raises(DatasetError, match="no manifest"):
        resolve_dataset(dataset.directory.parent.parent, dataset.feature_version, "missing-id")
    assert check_dataset(dataset)["train"] > 0


def test_a_dataset_of_another_feature_version_is_refused(dataset: Dataset) -> None:
    features_dir = dataset.directory.parent.parent
    other = features_dir / "fvOTHER"
    other.mkdir(exist_ok=True)
    (other / "LATEST").write_text(dataset.directory.name)
    if not (other / dataset.directory.name).exists():
        (other / dataset.directory.name).symlink_to(dataset.directory)
    with pytest.raises(DatasetError, match="feature version mismatch"):
        resolve_dataset(features_dir, "fvOTHER", None)


def test_recency_weights_halve_per_half_life_and_average_one() -> None:
    hour = 3_600_000
    ts = np.array([0, hour, 2 * hour], dtype=np.int64)
    weights = recency_weights(ts, hour)
    assert weights.mean() == pytest.approx(1.0)
    assert weights[2] / weights[1] == pytest.approx(2.0)
    assert weights[1] / weights[0] == pytest.approx(2.0)
    assert np.all(recency_weights(ts, None) == 1.0)
