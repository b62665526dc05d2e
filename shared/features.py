"""Feature definitions: the one place that says what the model sees, offline and online.

Features are built in two stages so training and serving cannot drift apart:
1. *raw counters* per example: windowed exposure and click counts per user, item and creator,
   slow signals (likes, hides, topic clicks) over the long window, item age and position. The
   feature service computes them point-in-time for training rows and "as of now" for the online
   store; the ranker reads the latter from Redis.
2. `dense_matrix` turns raw counters into the model's dense input (smoothed CTRs, log counts).
   Both the dataset builder and the ranker call this same function.

`FeatureSpec.version` hashes everything that changes what a feature means; it travels with every
dataset, snapshot and model, and readers refuse to mix versions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

import numpy as np

from shared.config import DataConfig, format_duration
from shared.timeutil import HOUR_MS, duration_ms

FORMULA_VERSION = 1
"""Bump when a transform in `dense_matrix` changes meaning without a config change."""

ID_COLUMNS = ("user_id", "item_id", "creator_id", "topic_id")
"""Categorical ids fed to embeddings (raw ids; the model maps unseen ones to 'unknown')."""

ENTITY_MEASURES = {
    "user": ("exposure", "clicks"),
    "item": ("exposure", "clicks"),
    "creator": ("exposure", "clicks"),
}
"""Windowed counters per entity. *Exposure* counts impressions weighted by a prior examination
curve, (1 + position) ** -position_discount: an item the logging policy kept at the top collects
clicks because it was seen, not because it is good, and clicks over exposure (COEC) corrects for
that, where clicks over raw impressions would teach the model the old policy's order."""

USER_TOPIC_MEASURES = ("clicks", "exposure", "hides")
"""Per (user, topic) counters, over the long and the recent taste window, packed as one column per
topic in user rows: `user_topic_<measure>_<t>` (long) and `user_topic_recent_<measure>_<t>`."""

TASTE_SPANS = ("", "recent_")
"""Name infixes of the two taste windows: long (no infix) and recent."""

ITEM_SLOW = ("item_exposure_long", "item_clicks_long", "item_likes_long", "item_hides_long")
ITEM_STATIC = ("creator_id", "topic_id", "published_at")


@dataclass(frozen=True)
class FeatureSpec:
    windows_ms: tuple[int, ...]
    long_window_ms: int
    recent_taste_window_ms: int
    n_topics: int
    prior_ctr: float
    prior_strength: float
    prior_like_rate: float
    prior_hide_rate: float
    affinity_strength: float
    position_discount: float

    @classmethod
    def from_config(cls, config: DataConfig) -> FeatureSpec:
        f = config.features
        return cls(
            windows_ms=tuple(duration_ms(w) for w in f.windows),
            long_window_ms=duration_ms(f.long_window),
            recent_taste_window_ms=duration_ms(f.recent_taste_window),
            n_topics=config.world.n_topics,
            prior_ctr=f.prior_ctr,
            prior_strength=f.prior_strength,
            prior_like_rate=f.prior_like_rate,
            prior_hide_rate=f.prior_hide_rate,
            affinity_strength=f.affinity_strength,
            position_discount=f.position_discount,
        )

    # ------------------------------------------------------------------ names

    @staticmethod
    def window_label(window_ms: int) -> str:
        return format_duration(timedelta(milliseconds=window_ms))

    def counter(self, entity: str, measure: str, window_ms: int) -> str:
        return f"{entity}_{measure}_{self.window_label(window_ms)}"

    @cached_property
    def user_fields(self) -> tuple[str, ...]:
        """Layout of a packed user row in the online store."""
        windowed = [self.counter("user", m, w) for w in self.windows_ms for m in ENTITY_MEASURES["user"]]
        topics = [
            f"user_topic_{span}{m}_{t}"
            for span in TASTE_SPANS
            for m in USER_TOPIC_MEASURES
            for t in range(self.n_topics)
        ]
        return (*windowed, "user_clicks_long", "user_exposure_long", *topics)

    @cached_property
    def item_fields(self) -> tuple[str, ...]:
        """Layout of a packed item row: static attributes, item and (denormalised) creator counters."""
        item = [self.counter("item", m, w) for w in self.windows_ms for m in ENTITY_MEASURES["item"]]
        creator = [self.counter("creator", m, w) for w in self.windows_ms for m in ENTITY_MEASURES["creator"]]
        return (*ITEM_STATIC, *item, *ITEM_SLOW, *creator)

    @cached_property
    def dense_names(self) -> tuple[str, ...]:
        names = ["position", "item_age_log"]
        for entity in ("user", "item"):
            for w in self.windows_ms:
                label = self.window_label(w)
                names += [
                    f"{entity}_ctr_{label}",
                    f"{entity}_exposure_log_{label}",
                    f"{entity}_clicks_log_{label}",
                ]
        names += [f"creator_ctr_{self.window_label(w)}" for w in self.windows_ms]
        names += [
            "item_like_rate",
            "item_hide_rate",
            "user_topic_affinity",
            "user_topic_ctr",
            "user_topic_lift",
            "user_topic_hide_rate",
            "user_topic_recent_ctr",
            "user_topic_recent_lift",
            "user_topic_recent_hide_rate",
        ]
        return tuple(names)

    @cached_property
    def version(self) -> str:
        document = {
            "formula": FORMULA_VERSION,
            "windows_ms": self.windows_ms,
            "long_window_ms": self.long_window_ms,
            "recent_taste_window_ms": self.recent_taste_window_ms,
            "n_topics": self.n_topics,
            "priors": [self.prior_ctr, self.prior_strength, self.prior_like_rate, self.prior_hide_rate],
            "affinity_strength": self.affinity_strength,
            "position_discount": self.position_discount,
            "dense": self.dense_names,
            "user_fields": self.user_fields,
            "item_fields": self.item_fields,
        }
        digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
        return f"fv{digest[:10]}"

    def describe(self) -> dict[str, object]:
        """What travels with datasets and models."""
        return {
            "feature_version": self.version,
            "dense": list(self.dense_names),
            "ids": list(ID_COLUMNS),
            "windows": [self.window_label(w) for w in self.windows_ms],
            "long_window": self.window_label(self.long_window_ms),
        }

    # ------------------------------------------------------------------ transforms

    @cached_property
    def _windowed_pairs(self) -> tuple[tuple[str, str], ...]:
        """(exposure, clicks) counter names for user then item, per window, in dense order."""
        return tuple(
            (self.counter(entity, "exposure", w), self.counter(entity, "clicks", w))
            for entity in ("user", "item")
            for w in self.windows_ms
        )

    @cached_property
    def _creator_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (self.counter("creator", "exposure", w), self.counter("creator", "clicks", w))
            for w in self.windows_ms
        )

    def exposure_weight(self, positions: np.ndarray) -> np.ndarray:
        """How much one impression at each position counts towards exposure."""
        return np.asarray((1.0 + np.asarray(positions, dtype=np.float64)) ** -self.position_discount)

    def _ctr(self, clicks: np.ndarray, exposure: np.ndarray) -> np.ndarray:
        """Clicks over expected clicks with a Beta prior: position-debiased, smoothed CTR."""
        return (clicks + self.prior_strength * self.prior_ctr) / (exposure + self.prior_strength)

    def dense_matrix(self, raw: Mapping[str, Any]) -> np.ndarray:
        """Raw counters (one array per name, aligned by example) -> float32 matrix in `dense_names` order.

        Required raw names: position, age_ms, every windowed user/item/creator counter, the item
        slow counters, user_clicks_long, user_exposure_long, and user_topic_{,recent_}{clicks,
        exposure,hides} (the user's history on *this item's* topic, long and recent).
        """
        columns: list[np.ndarray] = [
            np.asarray(raw["position"], dtype=np.float64),
            np.log1p(np.maximum(np.asarray(raw["age_ms"], dtype=np.float64), 0.0) / HOUR_MS),
        ]
        for exposure_name, clicks_name in self._windowed_pairs:
            exposure = np.asarray(raw[exposure_name], dtype=np.float64)
            clicks = np.asarray(raw[clicks_name], dtype=np.float64)
            columns += [self._ctr(clicks, exposure), np.log1p(exposure), np.log1p(clicks)]
        for exposure_name, clicks_name in self._creator_pairs:
            columns.append(
                self._ctr(
                    np.asarray(raw[clicks_name], dtype=np.float64),
                    np.asarray(raw[exposure_name], dtype=np.float64),
                )
            )
        m = self.prior_strength
        columns.append((raw["item_likes_long"] + m * self.prior_like_rate) / (raw["item_clicks_long"] + m))
        columns.append((raw["item_hides_long"] + m * self.prior_hide_rate) / (raw["item_exposure_long"] + m))
        s = self.affinity_strength
        columns.append((raw["user_topic_clicks"] + s / self.n_topics) / (raw["user_clicks_long"] + s))
        # Taste: the user's CTR on this topic, shrunk towards their own overall CTR, and the ratio.
        user_ctr = self._ctr(
            np.asarray(raw["user_clicks_long"], np.float64), np.asarray(raw["user_exposure_long"], np.float64)
        )
        topic_ctr = (raw["user_topic_clicks"] + s * user_ctr) / (raw["user_topic_exposure"] + s)
        columns += [topic_ctr, np.log(topic_ctr / user_ctr)]
        # Negative taste: users hide what they dislike, so hides per exposure on this topic say
        # which topics a user avoids, where clicks alone are too few to tell "disliked" from "unseen".
        hide_rate = (raw["user_topic_hides"] + m * self.prior_hide_rate) / (raw["user_topic_exposure"] + m)
        columns.append(hide_rate)
        # Recent taste, shrunk towards the long view: is the user into this topic *lately*?
        recent_ctr = (raw["user_topic_recent_clicks"] + s * topic_ctr) / (
            raw["user_topic_recent_exposure"] + s
        )
        columns += [recent_ctr, np.log(recent_ctr / user_ctr)]
        columns.append(
            (raw["user_topic_recent_hides"] + m * hide_rate) / (raw["user_topic_recent_exposure"] + m)
        )
        matrix = np.empty((np.shape(raw["position"])[0], len(columns)), dtype=np.float32, order="F")
        for j, column in enumerate(columns):
            matrix[:, j] = column
        return matrix

    def expected_ranges(self) -> dict[str, tuple[float, float]]:
        """Bounds every dense feature must respect; the dataset validator enforces them."""
        bounds: dict[str, tuple[float, float]] = {}
        for name in self.dense_names:
            if name.endswith("_rate") or name == "user_topic_affinity":
                bounds[name] = (0.0, 1.0)
            elif name in ("user_topic_lift", "user_topic_recent_lift"):
                bounds[name] = (-float("inf"), float("inf"))
            else:  # counts, ages, positions and clicks over exposure (which may exceed 1)
                bounds[name] = (0.0, float("inf"))
        return bounds


def raw_from_rows(
    spec: FeatureSpec, user_row: np.ndarray, item_rows: np.ndarray, now_ms: int, positions: np.ndarray
) -> dict[str, Any]:
    """Serving side of stage 1: one user's row and n item rows (online-store layouts) -> raw counters.

    Mirrors the dataset builder: the user's counters broadcast to every item (kept as scalars:
    numpy broadcasts them in `dense_matrix`, so the user's part is computed once, not per item),
    the topic counters are picked by each item's topic, and age is measured at request time.
    """
    raw: dict[str, Any] = {}
    for j, name in enumerate(spec.user_fields):
        if not name.startswith("user_topic_"):
            raw[name] = user_row[j]
    for j, name in enumerate(spec.item_fields):
        raw[name] = item_rows[:, j]
    topics = np.clip(raw["topic_id"].astype(np.int64), 0, spec.n_topics - 1)
    for span in TASTE_SPANS:
        for measure in USER_TOPIC_MEASURES:
            first = spec.user_fields.index(f"user_topic_{span}{measure}_0")
            raw[f"user_topic_{span}{measure}"] = user_row[first + topics]
    raw["age_ms"] = now_ms - raw["published_at"]
    raw["position"] = positions
    return raw
