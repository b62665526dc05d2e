"""The simulated world: users, creators, items and the ground-truth engagement model.

Everything is a pure function of the config and its seed, so any service (the backfill, the
traffic simulator, the trainer's oracle, the monitor) can rebuild the same world and ask it the
true click probability of any (user, item, position, time) without sharing state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np

from shared.config import DataConfig
from shared.timeutil import HOUR_MS, to_ms

_TASTE_FLOOR = 0.05
"""Keeps log-taste finite for topics a user never cares about."""


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-like popularity over n entities, in a random order (topic 0 is not always the top)."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    rng.shuffle(weights)
    return np.asarray(weights / weights.sum())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


@dataclass(frozen=True)
class World:
    """Entities as column arrays indexed by id (ids are 0..n-1)."""

    config: DataConfig
    topic_share: np.ndarray  # (T,) share of items and of baseline appeal per topic
    user_taste: np.ndarray  # (U, T) Dirichlet tastes
    user_taste_shifted: np.ndarray  # (U, T) tastes after the taste-shift drift
    user_shift_mask: np.ndarray  # (U,) bool: affected by the taste shift
    user_activity: np.ndarray  # (U,) sessions per day
    user_joined_ms: np.ndarray  # (U,) first possible session
    creator_quality: np.ndarray  # (C,)
    creator_topic: np.ndarray  # (C,) main topic
    item_creator: np.ndarray  # (I,)
    item_topic: np.ndarray  # (I,)
    item_quality: np.ndarray  # (I,) includes the creator's quality
    item_published_ms: np.ndarray  # (I,)

    @property
    def n_users(self) -> int:
        return int(self.user_taste.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_topic.shape[0])

    @property
    def n_topics(self) -> int:
        return int(self.topic_share.shape[0])

    @classmethod
    def create(cls, config: DataConfig) -> World:
        w = config.world
        entity_rng, taste_rng, drift_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(3)
        )
        start_ms = to_ms(w.start)
        topic_share = _zipf_weights(w.n_topics, w.topic_zipf, entity_rng)

        taste = taste_rng.dirichlet(np.full(w.n_topics, w.taste_concentration), size=w.n_users)
        shifted = taste_rng.dirichlet(np.full(w.n_topics, w.taste_concentration), size=w.n_users)
        shift_mask = drift_rng.random(w.n_users) < config.drift.taste_shift.share
        activity = w.sessions_per_user_day * entity_rng.lognormal(
            -(w.activity_sigma**2) / 2, w.activity_sigma, size=w.n_users
        )
        horizon_ms = int(w.horizon.total_seconds() * 1000)
        late = entity_rng.random(w.n_users) < w.cold_start_share
        joined = np.where(late, start_ms + entity_rng.integers(0, horizon_ms, size=w.n_users), start_ms)

        creator_weights = _zipf_weights(w.n_creators, w.creator_zipf, entity_rng)
        creator_quality = entity_rng.normal(0.0, w.creator_quality_sd, size=w.n_creators)
        creator_topic = entity_rng.choice(w.n_topics, size=w.n_creators, p=topic_share)

        item_creator = entity_rng.choice(w.n_creators, size=w.n_items, p=creator_weights)
        off_topic = entity_rng.random(w.n_items) >= w.creator_main_topic_share
        item_topic = np.where(
            off_topic,
            entity_rng.choice(w.n_topics, size=w.n_items, p=topic_share),
            creator_topic[item_creator],
        )
        item_quality = creator_quality[item_creator] + entity_rng.normal(0.0, w.item_quality_sd, w.n_items)
        pre_ms = int(w.pre_existing.total_seconds() * 1000)
        published = start_ms - pre_ms + entity_rng.integers(0, pre_ms + horizon_ms, size=w.n_items)

        item_creator, item_topic, item_quality, published = cls._add_cohort(
            config, drift_rng, item_creator, item_topic, item_quality, published, creator_topic
        )
        return cls(
            config=config,
            topic_share=topic_share,
            user_taste=taste,
            user_taste_shifted=shifted,
            user_shift_mask=shift_mask,
            user_activity=activity,
            user_joined_ms=joined.astype(np.int64),
            creator_quality=creator_quality,
            creator_topic=creator_topic,
            item_creator=item_creator.astype(np.int64),
            item_topic=item_topic.astype(np.int64),
            item_quality=item_quality,
            item_published_ms=published.astype(np.int64),
        )

    @staticmethod
    def _add_cohort(
        config: DataConfig,
        rng: np.random.Generator,
        item_creator: np.ndarray,
        item_topic: np.ndarray,
        item_quality: np.ndarray,
        published: np.ndarray,
        creator_topic: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The new-item-cohort drift: extra, better items on one topic, appended after the base items."""
        cohort = config.drift.new_item_cohort
        if cohort.starts_after is None or cohort.n_items == 0:
            return item_creator, item_topic, item_quality, published
        if cohort.topic >= config.world.n_topics:
            raise ValueError(f"drift.new_item_cohort.topic {cohort.topic} >= world.n_topics")
        on_topic = np.flatnonzero(creator_topic == cohort.topic)
        pool = on_topic if on_topic.size else np.arange(creator_topic.size)
        creators = rng.choice(pool, size=cohort.n_items)
        onset = to_ms(config.world.start + cohort.starts_after)
        spread_ms = max(1, int(cohort.spread.total_seconds() * 1000))
        quality = rng.normal(cohort.quality_boost, config.world.item_quality_sd, cohort.n_items)
        return (
            np.concatenate([item_creator, creators]),
            np.concatenate([item_topic, np.full(cohort.n_items, cohort.topic)]),
            np.concatenate([item_quality, quality]),
            np.concatenate([published, onset + rng.integers(0, spread_ms, cohort.n_items)]),
        )

    # ------------------------------------------------------------------ ground truth

    def _drift_active(self, starts_after: object, ts_ms: np.ndarray) -> np.ndarray:
        if starts_after is None:
            return np.zeros(ts_ms.shape, dtype=bool)
        onset = to_ms(self.config.world.start + starts_after)  # type: ignore[operator]
        return np.asarray(ts_ms >= onset)

    def taste_term(self, users: np.ndarray, items: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """How much the user likes the item's topic, in [-1, ~1]: 0 for an average topic."""
        topics = self.item_topic[items]
        taste = self.user_taste[users, topics]
        shifted = self._drift_active(self.config.drift.taste_shift.starts_after, ts_ms)
        if shifted.any():
            use_new = shifted & self.user_shift_mask[users]
            taste = np.where(use_new, self.user_taste_shifted[users, topics], taste)
        return np.asarray(np.log(self.n_topics * taste + _TASTE_FLOOR) / np.log(self.n_topics))

    def relevance_logit(self, users: np.ndarray, items: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """Position-free logit of a click: what an ideal ranker would sort by."""
        users, items, ts_ms = np.broadcast_arrays(users, items, ts_ms)
        cm = self.config.click_model
        drift = self.config.drift
        topics = self.item_topic[items]
        age_h = np.maximum(ts_ms - self.item_published_ms[items], 0) / HOUR_MS
        half_life_h = cm.age_half_life.total_seconds() / 3600
        logit = (
            cm.base_logit
            + cm.taste_weight * self.taste_term(users, items, ts_ms)
            + cm.quality_weight * self.item_quality[items]
            + cm.topic_popularity_weight * np.log(self.n_topics * self.topic_share[topics])
            - cm.age_weight * np.log2(1.0 + age_h / half_life_h)
        )
        swing = drift.topic_popularity
        swing_on = self._drift_active(swing.starts_after, ts_ms)
        if swing_on.any():
            delta = np.zeros(self.n_topics)
            delta[swing.rising_topics] += swing.delta_logit
            delta[swing.falling_topics] -= swing.delta_logit
            logit = logit + np.where(swing_on, delta[topics], 0.0)
        fresh_on = self._drift_active(drift.freshness_shift.starts_after, ts_ms)
        if fresh_on.any():
            extra = drift.freshness_shift.age_weight_delta * np.log2(1.0 + age_h / half_life_h)
            logit = logit - np.where(fresh_on, extra, 0.0)
        ctr_on = self._drift_active(drift.ctr_shift.starts_after, ts_ms)
        if ctr_on.any():
            logit = logit + np.where(ctr_on, drift.ctr_shift.delta_logit, 0.0)
        return np.asarray(logit)

    def relevance(self, users: np.ndarray, items: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """P(click | examined): the oracle's score."""
        return _sigmoid(self.relevance_logit(users, items, ts_ms))

    def examination(self, positions: np.ndarray) -> np.ndarray:
        """Position bias: the chance that a user looks at slot p at all."""
        return np.asarray((1.0 + positions) ** -self.config.click_model.position_bias)

    def click_probability(
        self, users: np.ndarray, items: np.ndarray, positions: np.ndarray, ts_ms: np.ndarray
    ) -> np.ndarray:
        """P(click | user, item, position, time) = examination(position) * relevance."""
        return np.asarray(self.examination(positions) * self.relevance(users, items, ts_ms))

    def like_probability(self, users: np.ndarray, items: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """P(like | click)."""
        cm = self.config.click_model
        taste = self.taste_term(users, items, ts_ms)
        return _sigmoid(cm.like_base_logit + cm.like_weight * (taste + self.item_quality[items]))

    def hide_probability(self, users: np.ndarray, items: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """P(hide | examined, not clicked): users hide what they dislike."""
        cm = self.config.click_model
        return _sigmoid(cm.hide_base_logit - cm.hide_weight * self.taste_term(users, items, ts_ms))

    def published_items(self, at_ms: int, max_age_ms: int | None = None) -> np.ndarray:
        """Ids of items visible at `at_ms` (published, and not older than max_age if given)."""
        visible = self.item_published_ms <= at_ms
        if max_age_ms is not None:
            visible &= self.item_published_ms > at_ms - max_age_ms
        return np.flatnonzero(visible)

    def active_users(self, at_ms: int) -> np.ndarray:
        return np.flatnonzero(self.user_joined_ms <= at_ms)

    def diurnal_factor(self, ts_ms: int) -> float:
        """Traffic multiplier over the day: quiet at night, busy in the evening."""
        hour = (ts_ms // HOUR_MS) % 24
        amplitude = self.config.traffic.diurnal_amplitude
        return float(1.0 + amplitude * np.sin(2 * np.pi * (hour - 14) / 24))

    def catalog_until(self, until: datetime) -> dict[str, np.ndarray]:
        """The item catalog visible at `until`, as columns (what a content service would publish)."""
        ids = self.published_items(to_ms(until))
        return {
            "item_id": ids,
            "creator_id": self.item_creator[ids],
            "topic_id": self.item_topic[ids],
            "published_at": self.item_published_ms[ids],
        }
