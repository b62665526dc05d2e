"""The drift the live scenario test injects, chosen the same way in the loop simulator and live."""

from __future__ import annotations

from typing import Any

import numpy as np

SCENARIO_KNOB = "topic_popularity"
SCENARIO_DELTA_LOGIT = 3.0
SCENARIO_TOPICS = 2


def abandoned_topics_swing(
    served_topic_counts: np.ndarray, topics: int = SCENARIO_TOPICS, delta_logit: float = SCENARIO_DELTA_LOGIT
) -> dict[str, Any]:
    """Users abandon the `topics` topics the champion served most lately, and take to the ones it
    served least: the topic-popularity knob aimed where it hurts the champion. Aimed elsewhere,
    the same swing costs the champion anything from nothing to 40 %, depending on what it happens
    to recommend at the time; aimed here it costs ~40 % for hours in every seed the loop
    benchmark tried, which is what a test that must never flake needs."""
    order = np.argsort(-np.asarray(served_topic_counts), kind="stable")
    return {
        "delta_logit": delta_logit,
        "falling_topics": [int(t) for t in order[:topics]],
        "rising_topics": [int(t) for t in order[-topics:]],
    }
