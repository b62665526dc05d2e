"""The simulated world: deterministic, position-biased, and every drift knob really drifts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from shared.config import DataConfig, load_config
from shared.settings import REPO_CONFIG_DIR
from shared.timeutil import to_ms
from shared.world import SessionSimulator, World


def tiny(overrides: dict[str, Any] | None = None) -> DataConfig:
    return load_config(DataConfig, REPO_CONFIG_DIR / "data.yaml", "tiny", overrides)


def simulate(config: DataConfig, days: float) -> pa.Table:
    world = World.create(config)
    end = config.world.start + timedelta(days=days)
    return pa.concat_tables([c.events for c in SessionSimulator(world).run(config.world.start, end)])


def of_type(events: pa.Table, kind: str) -> pa.Table:
    return events.filter(pc.equal(events["event_type"], kind))


def ctr(events: pa.Table) -> float:
    return float(of_type(events, "click").num_rows / max(of_type(events, "impression").num_rows, 1))


def split_at(events: pa.Table, at_ms: int) -> tuple[pa.Table, pa.Table]:
    ts = events["ts"].cast(pa.int64())
    return events.filter(pc.less(ts, at_ms)), events.filter(pc.greater_equal(ts, at_ms))


def test_same_seed_same_history() -> None:
    config = tiny()
    first, second = simulate(config, 1), simulate(config, 1)
    assert first.num_rows > 1000
    assert first.equals(second)


def test_another_seed_another_history() -> None:
    assert not simulate(tiny(), 1).equals(simulate(tiny({"seed": 8}), 1))


def test_a_window_is_identical_however_the_run_is_split() -> None:
    config = tiny()
    world = World.create(config)
    start = config.world.start + timedelta(days=1)
    end = start + timedelta(hours=6)
    alone = pa.concat_tables([c.events for c in SessionSimulator(world).run(start, end)])
    whole = simulate(config, 2)
    # the sessions that start inside the window, with their events until the window's end
    first = whole.group_by("request_id").aggregate([("ts", "min")])
    first_ts = first["ts_min"].cast(pa.int64())
    started = first.filter(pc.and_(pc.greater_equal(first_ts, to_ms(start)), pc.less(first_ts, to_ms(end))))
    inside = whole.filter(
        pc.and_(
            pc.is_in(whole["request_id"], started["request_id"]),
            pc.less(whole["ts"].cast(pa.int64()), to_ms(end)),  # a run ends at its end
        )
    )
    assert alone.num_rows > 0
    assert sorted(alone["event_id"].to_pylist()) == sorted(inside["event_id"].to_pylist())


def test_event_ids_are_unique_and_events_reference_served_slots() -> None:
    events = simulate(tiny(), 2)
    assert pc.count_distinct(events["event_id"]).as_py() == events.num_rows
    impressions = of_type(events, "impression")
    slots = set(zip(impressions["request_id"].to_pylist(), impressions["position"].to_pylist(), strict=True))
    for kind in ("click", "like", "hide"):
        rows = of_type(events, kind)
        assert set(zip(rows["request_id"].to_pylist(), rows["position"].to_pylist(), strict=True)) <= slots


def test_ctr_falls_with_position() -> None:
    events = simulate(tiny(), 4)
    imps = np.bincount(of_type(events, "impression")["position"].to_numpy())
    clicks = np.bincount(of_type(events, "click")["position"].to_numpy(), minlength=imps.size)
    rate = clicks / imps
    assert rate[0] > 2 * rate[-1]
    assert rate[:3].mean() > rate[-3:].mean()


def test_click_probability_is_examination_times_relevance() -> None:
    world = World.create(tiny())
    users, items = np.array([0, 1, 2]), np.array([5, 6, 7])
    ts = np.full(3, to_ms(world.config.live_start))
    for position in (0, 3, 9):
        positions = np.full(3, position)
        expected = world.examination(positions) * world.relevance(users, items, ts)
        np.testing.assert_allclose(world.click_probability(users, items, positions, ts), expected)
    assert world.examination(np.array([0]))[0] == 1.0


def test_observed_click_rate_matches_the_ground_truth() -> None:
    """The simulator samples from the model it exposes: the mean true P(click) predicts the CTR."""
    config = tiny()
    world = World.create(config)
    events = simulate(config, 4)
    imps = of_type(events, "impression")
    p = world.click_probability(
        imps["user_id"].to_numpy(), imps["item_id"].to_numpy(), imps["position"].to_numpy(),
        imps["ts"].cast(pa.int64()).to_numpy(),
    )  # fmt: skip
    assert abs(ctr(events) - p.mean()) < 4 * np.sqrt(p.mean() / imps.num_rows) + 0.002


def test_clicks_carry_dwell_and_follow_their_impression() -> None:
    events = simulate(tiny(), 1)
    clicks = of_type(events, "click")
    assert clicks["dwell_ms"].null_count == 0
    assert pc.min(clicks["dwell_ms"]).as_py() >= 0
    others = events.filter(pc.not_equal(events["event_type"], "click"))
    assert others["dwell_ms"].null_count == others.num_rows


def test_cold_start_users_appear_only_after_joining() -> None:
    config = tiny()
    world = World.create(config)
    late = np.flatnonzero(world.user_joined_ms > to_ms(config.world.start))
    assert late.size == pytest.approx(config.world.cold_start_share * config.world.n_users, rel=0.4)
    events = of_type(simulate(config, 4), "impression")
    users, ts = events["user_id"].to_numpy(), events["ts"].cast(pa.int64()).to_numpy()
    assert (ts >= world.user_joined_ms[users]).all()


def test_items_are_shown_only_once_published() -> None:
    config = tiny()
    world = World.create(config)
    events = of_type(simulate(config, 2), "impression")
    items, ts = events["item_id"].to_numpy(), events["ts"].cast(pa.int64()).to_numpy()
    assert (world.item_published_ms[items] <= ts).all()


# ---------------------------------------------------------------------------- drift knobs

ONSET_DAYS = 2


def test_ctr_shift_moves_the_click_rate() -> None:
    config = tiny({"drift": {"ctr_shift": {"starts_after": f"{ONSET_DAYS}d", "delta_logit": -1.0}}})
    before, after = split_at(
        simulate(config, 2 * ONSET_DAYS), to_ms(config.world.start) + ONSET_DAYS * 86_400_000
    )
    baseline_before, baseline_after = split_at(
        simulate(tiny(), 2 * ONSET_DAYS), to_ms(config.world.start) + ONSET_DAYS * 86_400_000
    )
    assert ctr(before) == pytest.approx(ctr(baseline_before))  # nothing changes before the onset
    assert ctr(after) < 0.75 * ctr(baseline_after)


def test_topic_popularity_swing_moves_topic_click_rates() -> None:
    rising, falling = 4, 0
    config = tiny(
        {"drift": {"topic_popularity": {"starts_after": f"{ONSET_DAYS}d", "rising_topics": [rising],
                                        "falling_topics": [falling], "delta_logit": 1.5}}}
    )  # fmt: skip
    world = World.create(config)
    onset = to_ms(config.world.start) + ONSET_DAYS * 86_400_000
    users = np.arange(world.n_users)
    for topic, direction in ((rising, 1), (falling, -1)):
        items = np.flatnonzero(world.item_topic == topic)[:1].repeat(users.size)
        shift = world.relevance_logit(users, items, np.full(users.size, onset)) - world.relevance_logit(
            users, items, np.full(users.size, onset - 1)
        )
        np.testing.assert_allclose(shift, direction * 1.5 - config.click_model.age_weight * 0, atol=1e-6)
    before, after = split_at(simulate(config, 2 * ONSET_DAYS), onset)

    def topic_ctr(events: pa.Table, topic: int) -> float:
        topics = world.item_topic[events["item_id"].to_numpy()]
        return ctr(events.filter(pa.array(topics == topic)))

    assert topic_ctr(after, rising) > topic_ctr(before, rising)
    assert topic_ctr(after, falling) < topic_ctr(before, falling)


def test_new_item_cohort_adds_items_that_get_shown() -> None:
    config = tiny(
        {"drift": {"new_item_cohort": {"starts_after": f"{ONSET_DAYS}d", "n_items": 40, "topic": 2}}}
    )
    world = World.create(config)
    base = World.create(tiny())
    assert world.n_items == base.n_items + 40
    cohort = np.arange(base.n_items, world.n_items)
    onset = to_ms(config.world.start) + ONSET_DAYS * 86_400_000
    assert (world.item_published_ms[cohort] >= onset).all()
    assert (world.item_topic[cohort] == 2).all()
    impressions = of_type(simulate(config, ONSET_DAYS + 2), "impression")
    shown = np.isin(impressions["item_id"].to_numpy(), cohort)
    assert shown.sum() > 50


def test_taste_shift_changes_affected_users_only() -> None:
    config = tiny({"drift": {"taste_shift": {"starts_after": f"{ONSET_DAYS}d", "share": 0.5}}})
    world = World.create(config)
    onset = to_ms(config.world.start) + ONSET_DAYS * 86_400_000
    users = np.repeat(np.arange(world.n_users), 5)
    items = np.tile(np.arange(5), world.n_users)
    delta = world.relevance_logit(users, items, np.full(users.size, onset)) - world.relevance_logit(
        users, items, np.full(users.size, onset - 1)
    )
    affected = world.user_shift_mask[users]
    assert np.abs(delta[~affected]).max() < 1e-3  # only ageing, which is negligible over 1 ms
    assert np.abs(delta[affected]).mean() > 0.3


def test_freshness_shift_penalises_old_items_more_than_new_ones() -> None:
    config = tiny({"drift": {"freshness_shift": {"starts_after": f"{ONSET_DAYS}d", "age_weight_delta": 2.0}}})
    world, unchanged = World.create(config), World.create(tiny())
    onset = to_ms(config.world.start) + ONSET_DAYS * 86_400_000
    published = world.item_published_ms <= onset
    items = np.flatnonzero(published)
    users = np.zeros(items.size, dtype=np.int64)
    at = np.full(items.size, onset)
    drop = unchanged.relevance_logit(users, items, at) - world.relevance_logit(users, items, at)
    age = onset - world.item_published_ms[items]
    assert np.all(drop >= 0)
    assert np.all(np.diff(drop[np.argsort(age)]) >= -1e-9)  # the older, the larger the penalty
    assert drop.max() > 2.0
    before = world.relevance_logit(users, items, at - 1) - unchanged.relevance_logit(users, items, at - 1)
    assert np.abs(before).max() < 1e-9  # nothing changes before the onset


def test_every_knob_is_off_by_default() -> None:
    drift = tiny().drift
    assert all(getattr(drift, knob).starts_after is None for knob in type(drift).model_fields)
