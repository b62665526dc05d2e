"""The closed loop as a specification, live, every part its own process (see scenario.py, also a
demo): a stable world raises no alert; the scenario drift (users abandon the topics the champion
serves most) is detected within a few runs, the alert starts a retrain, and the champion, whichever
version it is by then, gets back within the recovery tolerance of its pre-drift clicks per
oracle-expected click. Promotions, if any, are A/B wins; nothing is rolled back.

Why this cannot flake: the loop benchmark (python -m tests.benchmarks loop, docs/monitoring.md)
measures on the loop simulator the false-alarm rate of the stable world, the probability that this
drift goes undetected for `DETECT_WITHIN` runs, and how soon the champion recovers from it. The
steps in between (which retrain passes the gate, whether the A/B promotes) are the loop's business
and are not asserted: the outcome is."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import get_settings
from tests.integration.scenario import LiveStack, bootstrap, run_scenario, scenario_environment

pytestmark = pytest.mark.integration

QUEUE_DB, STORE_DB = 7, 8
DETECT_WITHIN = 3
"""Runs after the onset: the benchmark's estimate of P(no alarm within 2 runs) is below 1e-3."""
RECOVER_WITHIN = 16
"""Runs after the onset (8 simulated hours): the benchmark's loops were back above the floor
within this in every world it ran."""


def test_a_stable_world_stays_quiet_and_drift_is_detected_acted_on_and_recovered(
    redis_base_url: str, tmp_path: Path
) -> None:
    with scenario_environment(redis_base_url, tmp_path, QUEUE_DB, STORE_DB) as env:
        settings = get_settings()
        bootstrap(settings, env)
        with LiveStack(env, tmp_path) as stack:
            result = run_scenario(
                settings, stack=stack, detect_within=DETECT_WITHIN, recover_within=RECOVER_WITHIN
            )

    tolerance = settings.monitoring_config().quality.recovery_tolerance
    assert result.stable_runs >= 2
    assert result.stable_alerts == 0, "a stable world raised an alert"
    assert result.pre_drift_ctr_ratio is not None, "the champion's baseline was never set"
    assert result.detection_runs is not None, f"the drift was never detected within {DETECT_WITHIN} runs"
    assert result.detection_runs <= DETECT_WITHIN
    assert result.retrain_runs is not None, "the alert started no retrain"
    assert all(p["p_value"] <= p["alpha"] for p in result.promotions), "a promotion without an A/B win"
    assert result.rollbacks == 0, "a promotion made users worse off"
    assert result.recovered, (
        f"clicks per oracle-expected click stayed more than {tolerance:.0%} below the pre-drift "
        f"{result.pre_drift_ctr_ratio:.3f} for {RECOVER_WITHIN} runs (worst {result.worst_ctr_ratio}, "
        f"gates {result.gates}, promotions {len(result.promotions)})"
    )
