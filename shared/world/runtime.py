"""Drift injected into a running world: overrides of the drift knobs, shared through Redis so that
the traffic simulator (the ground truth) and every oracle (trainer, monitor) agree on the world."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa
from redis import Redis

from shared import keys
from shared.config import DataConfig, DriftConfig, deep_merge, format_duration
from shared.timeutil import to_ms
from shared.world.world import World


def drift_overrides(conn: Redis) -> dict[str, Any]:
    raw = conn.get(keys.WORLD_DRIFT)
    return json.loads(raw) if raw else {}


def with_overrides(config: DataConfig, overrides: dict[str, Any]) -> DataConfig:
    if not overrides:
        return config
    document = deep_merge(config.model_dump(mode="json"), {"drift": overrides})
    return DataConfig.model_validate(document)


def live_world(config: DataConfig, conn: Redis) -> World:
    """The world with any drift injected at run time."""
    return World.create(with_overrides(config, drift_overrides(conn)))


def inject_drift(conn: Redis, config: DataConfig, knob: str, at_ms: int, **params: Any) -> dict[str, Any]:
    """Start drift knob `knob` at sim time `at_ms` (with optional knob parameters)."""
    if knob not in DriftConfig.model_fields:
        raise ValueError(f"unknown drift knob {knob!r}; choose from {', '.join(DriftConfig.model_fields)}")
    after = timedelta(milliseconds=at_ms - to_ms(config.world.start))
    overrides = drift_overrides(conn)
    overrides[knob] = {**overrides.get(knob, {}), **params, "starts_after": format_duration(after)}
    with_overrides(config, overrides)  # validate before anyone sees it
    conn.set(keys.WORLD_DRIFT, json.dumps(overrides))
    return overrides


def clear_drift(conn: Redis) -> None:
    conn.delete(keys.WORLD_DRIFT)


def served_topic_counts(served: pa.Table, catalog: pa.Table, n_topics: int) -> np.ndarray:
    """How often each topic was served: the impression log's items looked up in the catalog."""
    order = np.argsort(catalog["item_id"].to_numpy())
    ids, topics = catalog["item_id"].to_numpy()[order], catalog["topic_id"].to_numpy()[order]
    items = served["item_id"].to_numpy()
    if ids.size == 0 or items.size == 0:
        return np.zeros(n_topics, dtype=np.int64)
    at = np.clip(np.searchsorted(ids, items), 0, ids.size - 1)
    known = ids[at] == items
    return np.bincount(topics[at][known], minlength=n_topics)


def abandoned_topics_swing(
    served_topic_counts: np.ndarray, topics: int = 2, delta_logit: float = 3.0
) -> dict[str, Any]:
    """Topic-popularity parameters aimed where it hurts the ranker: users abandon the `topics`
    topics it served most lately and take to the ones it served least. Aimed anywhere, the same
    swing costs the champion anything from nothing to 40 %, depending on what it happens to
    recommend at the time; aimed here it costs ~40 % for hours (the loop benchmark's "scenario"
    drift), which is what a demo, and a test that must never flake, need."""
    order = np.argsort(-np.asarray(served_topic_counts), kind="stable")
    return {
        "delta_logit": delta_logit,
        "falling_topics": [int(t) for t in order[:topics]],
        "rising_topics": [int(t) for t in order[-topics:]],
    }
