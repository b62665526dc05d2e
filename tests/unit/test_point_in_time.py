"""Point-in-time correctness: an example at time t sees only events strictly before t.

The tell-tale leak in click models is the label itself: a user's click counter computed over the
labelled impression table (or with an inclusive bound) counts the very click the example is
supposed to predict. These tests pin that down with a brute-force reference and with a feature
that does leak when computed the naive way.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.feature.compute import WindowCounter
from services.feature.datasets import DatasetWindow, build_examples
from shared.config import DataConfig
from shared.features import FeatureSpec
from shared.schemas import CATALOG_SCHEMA, EVENT_SCHEMA
from shared.timeutil import HOUR_MS, to_ms
from shared.world import SessionSimulator, World


def brute_force(
    keys: np.ndarray,
    ts: np.ndarray,
    q_keys: np.ndarray,
    q_ts: np.ndarray,
    window: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    w = np.ones(keys.size) if weights is None else weights
    return np.array(
        [np.sum(w * ((keys == k) & (ts >= t - window) & (ts < t))) for k, t in zip(q_keys, q_ts, strict=True)]
    )


def test_window_counter_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 30, 5000)
    ts = rng.integers(0, 10_000, 5000)
    q_keys = rng.integers(0, 35, 800)  # some keys never occur
    q_ts = np.concatenate([rng.integers(-500, 11_000, 700), ts[:100]])  # include exact event times
    counter = WindowCounter(keys, ts)
    for window in (1, 250, 3000, 50_000):
        np.testing.assert_array_equal(
            counter.count(q_keys, q_ts, window), brute_force(keys, ts, q_keys, q_ts, window)
        )


def test_weighted_counts_sum_the_weights() -> None:
    rng = np.random.default_rng(2)
    keys, ts, weights = rng.integers(0, 10, 3000), rng.integers(0, 5000, 3000), rng.random(3000)
    q_keys, q_ts = rng.integers(0, 12, 400), rng.integers(0, 6000, 400)
    counter = WindowCounter(keys, ts, weights)
    np.testing.assert_allclose(
        counter.count(q_keys, q_ts, 700),
        brute_force(keys, ts, q_keys, q_ts, 700, weights),
        rtol=1e-9,
        atol=1e-9,
    )


def test_window_bounds_are_half_open() -> None:
    counter = WindowCounter(np.array([7, 7, 7]), np.array([100, 200, 300]))
    # [t - w, t): the event at t - w counts, the event at t does not.
    assert counter.count(np.array([7]), np.array([300]), 100).tolist() == [1]
    assert counter.count(np.array([7]), np.array([301]), 101).tolist() == [2]
    assert counter.count(np.array([7]), np.array([100]), 1000).tolist() == [0]


def _events(rows: list[tuple[str, str, int, int, str, int, int]]) -> pa.Table:
    ids, types, users, items, requests, positions, ts = zip(*rows, strict=True)
    return pa.Table.from_pydict(
        {
            "event_id": list(ids), "event_type": list(types), "user_id": list(users), "item_id": list(items),
            "request_id": list(requests), "position": list(positions), "ts": list(ts),
            "dwell_ms": [1000 if t == "click" else None for t in types],
        },
        schema=EVENT_SCHEMA,
    )  # fmt: skip


def test_own_click_is_not_a_feature_of_its_impression(tiny_config: DataConfig) -> None:
    """A user who clicks only once: the clicked impression must see zero past clicks.

    Computed naively, over impressions joined with their labels and counting up to and including
    t, the same feature equals 1 on that row: it leaks the label. Ours does not.
    """
    spec = FeatureSpec.from_config(tiny_config)
    t0 = to_ms(tiny_config.world.start) + 10 * HOUR_MS
    events = _events(
        [
            ("a-0-i", "impression", 1, 10, "a", 0, t0),
            ("a-1-i", "impression", 1, 11, "a", 1, t0),
            ("a-0-c", "click", 1, 10, "a", 0, t0 + 5_000),
            ("b-0-i", "impression", 1, 12, "b", 0, t0 + HOUR_MS // 2),
        ]
    )
    catalog = pa.Table.from_pydict(
        {
            "item_id": [10, 11, 12],
            "creator_id": [1, 1, 2],
            "topic_id": [0, 0, 1],
            "published_at": [t0 - HOUR_MS] * 3,
        },
        schema=CATALOG_SCHEMA,
    )
    window = DatasetWindow.from_config(tiny_config, t0, t0 + 2 * HOUR_MS)
    examples, _ = build_examples(events, catalog, spec, window)
    by_item = {row["item_id"]: row for row in examples.to_pylist()}
    hour_or_more = next(w for w in spec.windows_ms if w >= HOUR_MS)  # covers b-0, half an hour later
    clicks_1h = f"user_clicks_log_{spec.window_label(hour_or_more)}"

    assert by_item[10]["label"] == 1
    assert by_item[10][clicks_1h] == 0.0  # the example's own label is invisible
    assert by_item[11][clicks_1h] == 0.0  # so is a click in the same request, after t
    assert by_item[12][clicks_1h] == np.float32(np.log1p(1))  # visible to a later request

    labelled = examples.to_pydict()
    naive = [
        sum(
            1
            for u, t, y in zip(labelled["user_id"], labelled["ts"], labelled["label"], strict=True)
            if u == 1 and t <= ts and y
        )
        for ts in labelled["ts"]
    ]
    assert naive[labelled["item_id"].index(10)] == 1  # the naive version leaks the label


def test_every_example_sees_exactly_the_past(tiny_config: DataConfig) -> None:
    """On simulated data: each counter equals a brute-force count of strictly earlier events."""
    world = World.create(tiny_config)
    start = tiny_config.world.start
    end = start + timedelta(days=2)
    events = pa.concat_tables([c.events for c in SessionSimulator(world).run(start, end)])
    catalog = pa.table(world.catalog_until(end)).cast(CATALOG_SCHEMA)
    spec = FeatureSpec.from_config(tiny_config)
    window = DatasetWindow.from_config(tiny_config, to_ms(start) + 86_400_000, to_ms(end))
    examples, _ = build_examples(events, catalog, spec, window)
    sample = examples.take(pa.array(np.random.default_rng(1).choice(examples.num_rows, 150, replace=False)))

    clicks = events.filter(pc.equal(events["event_type"], "click"))
    imps = events.filter(pc.equal(events["event_type"], "impression"))
    c_users, c_ts = clicks["user_id"].to_numpy(), clicks["ts"].cast(pa.int64()).to_numpy()
    i_items, i_ts = imps["item_id"].to_numpy(), imps["ts"].cast(pa.int64()).to_numpy()
    i_weights = spec.exposure_weight(imps["position"].to_numpy())
    day = spec.windows_ms[1]
    label = spec.window_label(day)
    users, items, ts = sample["user_id"].to_numpy(), sample["item_id"].to_numpy(), sample["ts"].to_numpy()
    expected_user_clicks = brute_force(c_users, c_ts, users, ts, day)
    expected_item_exposure = brute_force(i_items, i_ts, items, ts, day, i_weights)
    np.testing.assert_allclose(
        sample[f"user_clicks_log_{label}"].to_numpy(), np.log1p(expected_user_clicks), rtol=1e-6
    )
    np.testing.assert_allclose(
        sample[f"item_exposure_log_{label}"].to_numpy(), np.log1p(expected_item_exposure), rtol=1e-6
    )
    assert expected_user_clicks.sum() > 0  # the check is not vacuous
