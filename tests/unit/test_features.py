"""Feature definitions: transforms, the version hash, and offline/online parity."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

from services.feature.compute import Counters, event_log
from services.feature.datasets import DatasetWindow, build_examples
from shared.config import DataConfig, load_config
from shared.features import FeatureSpec, raw_from_rows
from shared.featurestore import CATALOG_FIELDS
from shared.schemas import CATALOG_SCHEMA
from shared.settings import REPO_CONFIG_DIR
from shared.timeutil import HOUR_MS, to_ms
from shared.world import SessionSimulator, World


def test_version_is_stable_and_tracks_meaning(tiny_config: DataConfig) -> None:
    spec = FeatureSpec.from_config(tiny_config)
    assert spec.version == FeatureSpec.from_config(tiny_config).version
    changed = load_config(DataConfig, REPO_CONFIG_DIR / "data.yaml", "tiny", {"features": {"prior_ctr": 0.1}})
    assert FeatureSpec.from_config(changed).version != spec.version
    resized = load_config(
        DataConfig, REPO_CONFIG_DIR / "data.yaml", "tiny", {"features": {"windows": ["1h", "3d"]}}
    )
    assert FeatureSpec.from_config(resized).version != spec.version


def test_unrelated_config_does_not_change_the_version(tiny_config: DataConfig) -> None:
    other = load_config(
        DataConfig, REPO_CONFIG_DIR / "data.yaml", "tiny", {"backfill": {"days": 9}, "seed": 3}
    )
    assert FeatureSpec.from_config(other).version == FeatureSpec.from_config(tiny_config).version


def test_catalog_layout_is_the_head_of_the_item_layout(tiny_config: DataConfig) -> None:
    assert FeatureSpec.from_config(tiny_config).item_fields[: len(CATALOG_FIELDS)] == CATALOG_FIELDS


def test_dense_transforms(tiny_config: DataConfig) -> None:
    spec = FeatureSpec.from_config(tiny_config)
    raw = {name: np.zeros(2) for name in (*spec.user_fields, *spec.item_fields)}
    hour = spec.window_label(spec.windows_ms[0])
    raw[f"user_exposure_{hour}"] = np.array([0.0, 80.0])
    raw[f"user_clicks_{hour}"] = np.array([0.0, 20.0])
    raw.update(
        age_ms=np.array([0.0, 3 * HOUR_MS]), position=np.array([0.0, 4.0]),
        user_topic_clicks=np.array([0.0, 5.0]), user_clicks_long=np.array([0.0, 5.0]),
        user_topic_exposure=np.array([0.0, 10.0]), user_exposure_long=np.array([0.0, 50.0]),
        user_topic_hides=np.array([0.0, 2.0]),
        user_topic_recent_clicks=np.array([0.0, 1.0]), user_topic_recent_exposure=np.array([0.0, 1.0]),
        user_topic_recent_hides=np.zeros(2),
        item_likes_long=np.zeros(2), item_clicks_long=np.zeros(2), item_hides_long=np.zeros(2), item_exposure_long=np.zeros(2),
    )  # fmt: skip
    dense = spec.dense_matrix(raw)
    column = {name: dense[:, j] for j, name in enumerate(spec.dense_names)}
    m, p = spec.prior_strength, spec.prior_ctr
    assert column[f"user_ctr_{hour}"][0] == pytest.approx(p)  # no history: the prior
    assert column[f"user_ctr_{hour}"][1] == pytest.approx((20 + m * p) / (80 + m))
    assert column[f"user_exposure_log_{hour}"][1] == pytest.approx(np.log1p(80))
    assert column["item_age_log"][1] == pytest.approx(np.log1p(3))
    assert column["position"].tolist() == [0, 4]
    s = spec.affinity_strength
    assert column["user_topic_affinity"][1] == pytest.approx((5 + s / spec.n_topics) / (5 + s))
    h = spec.prior_hide_rate
    assert column["user_topic_hide_rate"][0] == pytest.approx(h)  # no history: the prior
    assert column["user_topic_hide_rate"][1] == pytest.approx((2 + m * h) / (10 + m))
    assert dense.dtype == np.float32
    assert dense.shape == (2, len(spec.dense_names))


def test_online_rows_reproduce_offline_features(tiny_config: DataConfig) -> None:
    """The ranker's path (packed snapshot rows -> raw_from_rows -> dense) equals the training rows."""
    world = World.create(tiny_config)
    start = tiny_config.world.start
    end = start + timedelta(days=3)
    events = pa.concat_tables([c.events for c in SessionSimulator(world).run(start, end)])
    catalog = pa.table(world.catalog_until(end)).cast(CATALOG_SCHEMA)
    spec = FeatureSpec.from_config(tiny_config)
    window = DatasetWindow.from_config(tiny_config, to_ms(start) + 2 * 86_400_000, to_ms(end))
    examples, _ = build_examples(events, catalog, spec, window)
    request = examples.filter(
        pa.compute.equal(examples["request_id"], examples["request_id"][len(examples) // 2])
    )
    t = request["ts"][0].as_py()
    user = request["user_id"][0].as_py()
    items = request["item_id"].to_numpy()

    counters = Counters(spec, event_log(events, catalog))
    user_row = counters.user_rows(np.array([user]), t)[0]
    lookup = {i: j for j, i in enumerate(catalog["item_id"].to_pylist())}
    rows = [lookup[int(i)] for i in items]
    item_rows = counters.item_rows(
        items,
        catalog["creator_id"].to_numpy()[rows],
        catalog["topic_id"].to_numpy()[rows],
        catalog["published_at"].cast(pa.int64()).to_numpy()[rows],
        t,
    )
    online = spec.dense_matrix(raw_from_rows(spec, user_row, item_rows, t, request["position"].to_numpy()))
    offline = np.column_stack([request[name].to_numpy() for name in spec.dense_names])
    assert request.num_rows >= 5
    np.testing.assert_allclose(online, offline, rtol=1e-6, atol=1e-7)
