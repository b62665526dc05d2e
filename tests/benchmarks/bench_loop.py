"""The learning loop's decisions and their error rates, on the loop simulator (tests/loopsim).

`python -m tests.benchmarks loop` (or `make bench-loop`): several tiny worlds, one process per
core; in each, a champion warms up, sets its baseline and serves a stable world for hundreds of
monitoring runs without acting (false alarms), carries A/A and power experiments of the A/B rule,
and from points of its stable phase every drift knob is injected (detection), a few of them
through the whole loop (retrain, gate, A/B, promotion, recovery). Prints a table and one line
`LOOP_JSON {...}`; docs/monitoring.md explains the rules these figures measure.

Environment: FEEDRANK_LOOP_WORLDS, FEEDRANK_LOOP_STABLE_RUNS, FEEDRANK_LOOP_FORKS,
FEEDRANK_LOOP_PROCESSES shrink or grow the plan (defaults: the plan in experiments.Plan).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from dataclasses import replace
from typing import Any

import structlog

from shared.config import DataConfig, ModelConfig, MonitoringConfig, ServingConfig, load_config
from shared.settings import REPO_CONFIG_DIR
from tests.loopsim.experiments import KNOBS, SCENARIO, Plan, WorldResult, run_world, summarise
from tests.loopsim.twin import Configs

PROFILE = "tiny"
"""The loop runs on the tiny world: the world of the live scenario test and of `make e2e`."""


def configs() -> Configs:
    return Configs(
        load_config(DataConfig, REPO_CONFIG_DIR / "data.yaml", PROFILE),
        load_config(ModelConfig, REPO_CONFIG_DIR / "model.yaml", PROFILE),
        load_config(ServingConfig, REPO_CONFIG_DIR / "serving.yaml", PROFILE),
        load_config(MonitoringConfig, REPO_CONFIG_DIR / "monitoring.yaml", PROFILE),
    )


def plan_from_env() -> Plan:
    plan = Plan()
    overrides = {
        "worlds": "FEEDRANK_LOOP_WORLDS",
        "stable_runs": "FEEDRANK_LOOP_STABLE_RUNS",
        "forks": "FEEDRANK_LOOP_FORKS",
        "scenario_forks": "FEEDRANK_LOOP_SCENARIO_FORKS",
        "loop_worlds": "FEEDRANK_LOOP_LOOP_WORLDS",
    }
    chosen: dict[str, Any] = {
        field: int(os.environ[env]) for field, env in overrides.items() if env in os.environ
    }
    return replace(plan, **chosen)


def _world(args: tuple[Configs, int, Plan]) -> WorldResult:
    """One world in its own process (training there uses one thread: the processes fill the cores)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return run_world(*args)


def run(ctx: object = None) -> dict[str, Any]:
    started = time.perf_counter()
    cfg, plan = configs(), plan_from_env()
    cfg = replace(
        cfg,
        model=cfg.model.model_copy(update={"training": cfg.model.training.model_copy(update={"threads": 1})}),
    )
    processes = int(os.environ.get("FEEDRANK_LOOP_PROCESSES", str(os.cpu_count() or 1)))
    print(f"loop benchmark: {plan.worlds} tiny worlds on {processes} processes ...", flush=True)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = []
        for result in pool.imap_unordered(_world, [(cfg, seed, plan) for seed in range(plan.worlds)]):
            results.append(result)
            print(
                f"  world {result.seed}: {result.stable_runs} stable runs, {result.false_alarm_runs} false "
                f"alarm(s), {time.perf_counter() - started:.0f} s",
                flush=True,
            )
    summary = summarise(sorted(results, key=lambda r: r.seed), plan, cfg)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    _print(summary, cfg, plan)
    print("LOOP_JSON " + json.dumps(_json(summary), default=float))
    return _json(summary)


def _json(summary: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable line: the issue's fields first, then the rest."""
    return {
        "stable_runs": summary["stable_runs"],
        "false_alarms": summary["false_alarms"],
        "aa_experiments": summary["aa_experiments"],
        "aa_false_promotions": summary["aa_false_promotions"],
        "ab_alpha": summary["ab_alpha"],
        "ab_power": summary["ab_power"],
        "ab_lift": summary["ab_lift"],
        "knobs": {
            knob: {
                key: figures[key]
                for key in (
                    "detected",
                    "seeds",
                    "detection_rate",
                    "delay_runs",
                    "delay_runs_max",
                    "miss_probability",
                    "ratio_before",
                    "ratio_worst",
                    "ratio_after",
                    "promoted",
                    "recovered",
                    "loops_promoted",
                    "recovery_runs_max",
                    "loops_not_recovered",
                    "loops",
                )
            }
            for knob, figures in summary["knobs"].items()
        },
        **{
            key: summary[key]
            for key in (
                "false_alarm_rate",
                "false_alarm_ci",
                "alarms_by_kind",
                "aa_rate_ci",
                "aa_rejections",
                "ab_power_experiments",
                "ab_power_looks",
                "cusum_threshold",
                "worlds",
                "wall_seconds",
            )
        },
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print(summary: dict[str, Any], cfg: Configs, plan: Plan) -> None:
    run_minutes = cfg.sim_ms(cfg.monitoring.schedule_every) / 60_000
    lo, hi = summary["false_alarm_ci"]
    print(
        f"\nlearning loop on the tiny world ({summary['worlds']} worlds, one run = {run_minutes:.0f} sim min)"
    )
    print(
        f"  false alarms    {summary['false_alarms']} in {summary['stable_runs']} stable runs "
        f"(rate {summary['false_alarm_rate']:.4f}, 95% CI {lo:.4f}..{hi:.4f}; target <= 0.001): the alerts "
        f"that start a retrain ({', '.join(cfg.monitoring.retrain.triggers)})"
    )
    by_kind = summary["alarms_by_kind"]
    print(
        "  drift alerts    runs with one, per kind (alerts for people, no retrain): "
        + (", ".join(f"{kind} {count} ({count / summary['stable_runs']:.3f})" for kind, count in sorted(by_kind.items()))
           or "none")
    )  # fmt: skip
    lo, hi = summary["aa_rate_ci"]
    print(
        f"  A/A             {summary['aa_false_promotions']} false promotions in {summary['aa_experiments']} "
        f"experiments (95% CI {lo:.3f}..{hi:.3f}; alpha {summary['ab_alpha']}: promote side <= "
        f"{summary['ab_alpha'] / 2:.3f}); {summary['aa_rejections']} ended by max_duration"
    )
    print(
        f"  A/B power       {summary['ab_power']:.2f} at a {summary['ab_lift']:.0%} CTR lift "
        f"({summary['ab_power_experiments']} experiments; median looks to promotion "
        f"{_fmt(summary['ab_power_looks'], 0)}; max_duration {cfg.monitoring.ab.max_duration})"
    )
    print(
        f"\n  {'drift':<18}{'detected':>10}{'median':>8}{'max':>5}{'P(miss)':>9}   {'before':>7}{'worst':>7}"
        f"{'after':>7}  promoted  recovered"
    )
    for knob in (*KNOBS, SCENARIO):
        k = summary["knobs"][knob]
        miss = "-" if k["miss_probability"] is None else f"{k['miss_probability']:.1e}"
        print(
            f"  {knob:<18}{k['detected']:>5}/{k['seeds']:<4}{_fmt(k['delay_runs'], 0):>8}"
            f"{_fmt(k['delay_runs_max'], 0) if k['delay_runs_max'] is not None else '-':>5}{miss:>9}   "
            f"{_fmt(k['ratio_before']):>7}{_fmt(k['ratio_worst']):>7}{_fmt(k['ratio_after']):>7}  "
            f"{k['promoted']!s:>8}  {k['recovered']!s:>9}"
        )
    print(
        f"  (detected within {plan.max_drift_runs} runs of the onset; P(miss): within {plan.evidence_runs} runs, "
        "from the spread of the CUSUM's evidence; ratios: clicks per oracle-expected click of the champion, "
        "from the first whole-loop run)"
    )
    scenario = summary["knobs"][SCENARIO]
    print(
        f"  scenario drift, whole loop in every world: promoted in {scenario['loops_promoted']} of "
        f"{len(scenario['loops'])}; back above the recovery floor ({cfg.monitoring.quality.recovery_tolerance:.0%} "
        f"below the pre-drift level) after at most {_fmt(scenario['recovery_runs_max'], 0)} runs; "
        f"never: {scenario['loops_not_recovered']}"
    )
    print(f"  {summary['wall_seconds']:.0f} s")
