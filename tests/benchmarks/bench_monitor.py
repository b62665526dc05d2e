"""Monitoring: false alarms of a stable world, detection delay per drift knob, alert -> promotion.

Runs the live loop of tests/integration/scenario.py on the tiny world (the one whose whole
drift -> retrain -> promotion cycle fits in minutes): one fresh bootstrap per drift knob. The first
knob's run also counts alerts over many monitoring runs of the stable world before the drift, and
follows the loop through to the promotion; the others stop at the alert.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from shared.config import DriftConfig
from shared.settings import get_settings
from tests.benchmarks.common import BenchContext
from tests.integration.scenario import LiveStack, bootstrap, run_scenario, scenario_environment

STABLE_RUNS = int(os.environ.get("FEEDRANK_BENCH_STABLE_RUNS", "100"))
"""Monitoring runs of the stable world counted for false alarms (before the first drift)."""

FULL_LOOP_KNOB = "topic_popularity"
"""The knob whose run is followed from the alert through retrain, gate and A/B to promotion."""

OTHER_KNOBS = os.environ.get("FEEDRANK_BENCH_OTHER_KNOBS")
"""Comma-separated drift knobs measured up to their alert besides the full loop's (default: all;
empty: none, for a quicker false-alarm and loop measurement)."""


def run(ctx: BenchContext) -> dict[str, Any]:
    base_url = ctx.env["FEEDRANK_QUEUE_URL"].rsplit("/", 1)[0]
    others = [k for k in DriftConfig.model_fields if k != FULL_LOOP_KNOB]
    if OTHER_KNOBS is not None:
        wanted = {k for k in OTHER_KNOBS.split(",") if k}
        if wanted - set(others):
            raise SystemExit(
                f"FEEDRANK_BENCH_OTHER_KNOBS: unknown drift knobs {sorted(wanted - set(others))}; known: {others}"
            )
        others = [k for k in others if k in wanted]
    knobs = [FULL_LOOP_KNOB, *others]
    per_knob: dict[str, dict[str, Any]] = {}
    stable: dict[str, Any] = {}
    loop: dict[str, Any] = {}
    for knob in knobs:
        full = knob == FULL_LOOP_KNOB
        with (
            tempfile.TemporaryDirectory(prefix=f"feedrank-bench-monitor-{knob}-") as tmp,
            scenario_environment(base_url, Path(tmp), queue_db=5, store_db=6) as env,
        ):
            settings = get_settings()
            bootstrap(settings, env)
            with LiveStack(env, Path(tmp)) as stack:
                result = run_scenario(
                    settings,
                    knob=knob,
                    stable_runs=STABLE_RUNS if full else 2,
                    stack=stack,
                    stop_after="recovery" if full else "alert",
                    max_drift_runs=20,
                )
        per_knob[knob] = {
            "detected": result.detection_runs is not None,
            "runs_to_alert": result.detection_runs,
            "sim_minutes_to_alert": result.detection_sim_minutes,
        }
        if full:
            stable = {"stable_runs": result.stable_runs, "false_alarms": result.stable_alerts}
            loop = {
                "gate": result.gate,
                "promoted_version": result.promoted_version,
                "alert_to_promotion_wall_s": result.alert_to_promotion_s,
                "pre_drift_ctr_ratio": result.pre_drift_ctr_ratio,
                "drifted_ctr_ratio": result.drifted_ctr_ratio,
                "recovered_ctr_ratio": result.recovered_ctr_ratio,
                "recovered": result.recovered,
            }
    false_alarm_rate = 100 * stable["false_alarms"] / max(stable["stable_runs"], 1)
    print("monitoring (tiny world, live loop)")
    print(
        f"  false alarms: {stable['false_alarms']} in {stable['stable_runs']} runs of a stable world "
        f"({false_alarm_rate:.1f} per 100 runs)"
    )
    for knob, figures in per_knob.items():
        if figures["detected"]:
            print(
                f"  {knob:<18} alert after {figures['runs_to_alert']} run(s), "
                f"{figures['sim_minutes_to_alert']} simulated minutes after onset"
            )
        else:
            print(f"  {knob:<18} NOT detected within 20 runs")
    print(
        f"  loop ({FULL_LOOP_KNOB}): gate {loop['gate']}, promoted v{loop['promoted_version']}, "
        f"alert -> promotion {loop['alert_to_promotion_wall_s']} s wall; ctr/oracle "
        f"{loop['pre_drift_ctr_ratio']} before, {loop['drifted_ctr_ratio']} drifted, "
        f"{loop['recovered_ctr_ratio']} after (recovered: {loop['recovered']})"
    )
    return {
        "false_alarms_per_100_runs": false_alarm_rate,
        **stable,
        "detection": per_knob,
        "loop": loop,
    }
