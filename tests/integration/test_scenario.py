"""The closed loop as a specification: a stable world raises no alert; drift is detected, a
retrain starts by itself, its candidate passes the offline gate, wins the A/B test and is
promoted, and online clicks per oracle-expected click recover to within the configured tolerance
of their pre-drift level. Everything real, every part its own process; see scenario.py (also a
demo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import get_settings
from tests.integration.scenario import LiveStack, bootstrap, run_scenario, scenario_environment

pytestmark = pytest.mark.integration

QUEUE_DB, STORE_DB = 7, 8


def test_a_stable_world_stays_quiet_and_drift_is_detected_retrained_promoted_and_recovered(
    redis_base_url: str, tmp_path: Path
) -> None:
    with scenario_environment(redis_base_url, tmp_path, QUEUE_DB, STORE_DB) as env:
        settings = get_settings()
        bootstrap(settings, env)
        with LiveStack(env, tmp_path) as stack:
            result = run_scenario(settings, stack=stack, stop_after="recovery")

    tolerance = settings.monitoring_config().quality.recovery_tolerance
    assert result.stable_runs >= 4
    assert result.stable_alerts == 0, "a stable world raised an alert"
    assert result.detection_runs is not None, "the drift was never detected"
    assert result.retrain_runs is not None, "the alert started no retrain"
    assert result.gate == "passed"
    assert result.promoted_version is not None, "the challenger was never promoted"
    assert result.pre_drift_ctr_ratio is not None
    assert result.drifted_ctr_ratio is not None
    assert result.recovered, (
        f"online clicks per oracle-expected click stayed at {result.recovered_ctr_ratio} after the "
        f"promotion: more than {tolerance:.0%} below the pre-drift {result.pre_drift_ctr_ratio:.3f}"
    )
