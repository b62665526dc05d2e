"""The drift the live scenario test injects, chosen the same way in the loop simulator and live:
the topic-popularity knob aimed at the topics the champion served most in the last hour
(shared.world.runtime.abandoned_topics_swing; `python -m services.traffic inject-drift
topic_popularity --against-served` does the same on a running stack)."""

from __future__ import annotations

from shared.world.runtime import abandoned_topics_swing

SCENARIO_KNOB = "topic_popularity"

__all__ = ["SCENARIO_KNOB", "abandoned_topics_swing"]
