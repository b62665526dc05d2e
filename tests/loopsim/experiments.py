"""Error rates of the monitor's decisions, measured on the loop simulator (twin.py).

For each of several worlds (seeds): bootstrap a champion, let it warm up and measure its baseline,
then watch a stable world for many monitoring runs without acting (false alarms). The stable
phase's served feeds also carry A/A experiments (the same model on both arms, users split by a
fresh salt per experiment) and power experiments (the same, with the treatment arm's click
probability raised by a stated lift). From points of the stable phase, forks inject each drift
knob and measure detection; a few forks run the whole loop (retrain, gate, A/B, promotion).
Every decision is taken by the monitor's own functions (services.monitor.rules).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.monitor.assess import CHAMPION_VARIANT, arm_samples
from services.monitor.rules import AbState, ArmSample, decide_ab
from services.ranker.ranking import ab_bucket
from shared.config import DriftConfig
from shared.timeutil import duration_ms
from tests.loopsim.drifts import SCENARIO_KNOB, abandoned_topics_swing
from tests.loopsim.twin import Configs, RunRecord, Twin

KNOBS = tuple(DriftConfig.model_fields)
SCENARIO = "scenario"
"""The live scenario test's drift (drifts.py): measured on more forks, for its detection claim."""


@dataclass(frozen=True)
class Plan:
    """How much to simulate. The defaults fit `python -m tests.benchmarks loop` in ~15 minutes."""

    worlds: int = 4
    stable_runs: int = 260  # per world, after the baseline
    forks: int = 5  # per world: drift onsets spread over the stable phase
    scenario_forks: int = 10  # per world, for the scenario drift
    max_drift_runs: int = 12  # runs (6 simulated hours) after an onset to detect a drift in
    evidence_runs: int = 2  # runs whose CUSUM evidence estimates the scenario's miss probability
    loop_worlds: int = 2  # worlds on which every knob also runs the whole loop
    loop_runs: int = 36  # 18 simulated hours
    aa_per_world: int = 50
    power_per_world: int = 25
    lift: float = 0.10  # relative CTR lift of the power experiments
    knob_params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class WorldResult:
    seed: int
    stable_runs: int = 0
    alarms: dict[str, int] = field(default_factory=dict)  # alert kind -> runs on which it fired
    false_alarm_runs: int = 0  # runs with any alert that would start a retrain
    ratios: list[float] = field(default_factory=list)
    aa: list[dict[str, Any]] = field(default_factory=list)
    power: list[dict[str, Any]] = field(default_factory=list)
    detection: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    loops: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def champion_ratio(record: RunRecord) -> float | None:
    return record.champion_ratio


def triggers(twin: Twin, record: RunRecord) -> list[str]:
    """The run's alerts that start a retrain (monitoring.retrain.triggers)."""
    kinds = twin.configs.monitoring.retrain.triggers
    return [a for a in record.alerts if a.split(":")[0] in kinds]


def run_world(configs: Configs, seed: int, plan: Plan) -> WorldResult:
    started = time.perf_counter()
    result = WorldResult(seed)
    twin = Twin(configs, seed=seed, acting=False)
    twin.bootstrap()
    while twin.step().status != "ok":  # warm-up and baseline
        pass
    fork_every = max(1, plan.stable_runs // max(plan.forks, plan.scenario_forks))
    forks: list[Twin] = []
    first_stable = len(twin.runs)
    for index in range(plan.stable_runs):
        if index % fork_every == 0 and len(forks) < max(plan.forks, plan.scenario_forks):
            forks.append(twin.fork(1000 + index))
        record = twin.step()
        result.stable_runs += 1
        kinds = {a.split(":")[0] for a in [*record.alerts, *record.drift]}
        for kind in kinds:
            result.alarms[kind] = result.alarms.get(kind, 0) + 1
        result.false_alarm_runs += int(bool(triggers(twin, record)))
        if record.champion_ratio is not None:
            result.ratios.append(record.champion_ratio)
    stable_start = twin.runs[first_stable - 1].at_ms
    result.aa, result.power = ab_experiments(twin, stable_start, plan, seed)
    for knob in KNOBS:
        params = plan.knob_params.get(knob, {})
        result.detection[knob] = [
            detect(fork.fork(7 + i), knob, params, plan) for i, fork in enumerate(forks[: plan.forks])
        ]
        if seed < plan.loop_worlds:
            result.loops[knob] = full_loop(forks[0].fork(99), knob, params, plan)
    result.detection[SCENARIO] = [
        detect(fork.fork(7 + i), SCENARIO_KNOB, scenario_params(fork), plan)
        for i, fork in enumerate(forks[: plan.scenario_forks])
    ]
    # the scenario runs the whole loop in every world: its recovery bound is the live test's
    result.loops[SCENARIO] = full_loop(forks[0].fork(99), SCENARIO_KNOB, scenario_params(forks[0]), plan)
    result.seconds = time.perf_counter() - started
    return result


def scenario_params(twin: Twin) -> dict[str, Any]:
    """The scenario drift aimed at what the champion served in the last hour (as the live test)."""
    served = twin.served_between(twin.now_ms - 3_600_000, twin.now_ms)
    topics = twin.world.item_topic[served["item_id"].to_numpy()]
    return abandoned_topics_swing(np.bincount(topics, minlength=twin.world.n_topics))


def detect(twin: Twin, knob: str, params: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Inject the knob; runs until a retrain trigger fires (and at least `plan.evidence_runs`
    runs, whose evidence the miss-probability estimate reads), or the budget ends."""
    before = twin.runs[-1].champion_ratio if twin.runs else None
    twin.inject(knob, **params)
    ratios: list[float] = []
    statistics: list[float] = []
    llrs: list[float] = []  # the CUSUM's evidence per run (its sum bounds the statistic from below)
    found: tuple[int, list[str]] | None = None
    for run in range(1, plan.max_drift_runs + 1):
        record = twin.step()
        if record.champion_ratio is not None:
            ratios.append(record.champion_ratio)
        statistics.append(record.cusum or 0.0)
        look = twin.last_outcome.assessment.quality_look if twin.last_outcome else None
        llrs.append(float(look["llr"]) if look else 0.0)
        fired = triggers(twin, record)
        if fired and found is None:
            found = (run, fired)
        if found is not None and run >= plan.evidence_runs:
            break
    return {
        "detected": found is not None,
        "runs": found[0] if found else None,
        "alerts": found[1] if found else [],
        "ratio_before": before,
        "ratios": ratios,
        "cusum": statistics,
        "llr": llrs,
    }


def full_loop(twin: Twin, knob: str, params: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The whole loop after a drift: detection, retrain, gate, A/B, promotion, and where the
    champion's clicks per oracle-expected click end up against where they were before."""
    twin.acting = True
    baseline = twin.memory[twin.champion.version].track
    before = baseline.baseline.ratio if baseline is not None and baseline.baseline is not None else None
    onset = twin.now_ms
    audit_from = len(twin.audit)
    twin.inject(knob, **params)
    first_alert: int | None = None
    ratios: list[tuple[int, float, int]] = []  # (run, ratio, champion version)
    for run in range(1, plan.loop_runs + 1):
        record = twin.step()
        if record.champion_ratio is not None:
            ratios.append((run, record.champion_ratio, record.champion))
        if first_alert is None and triggers(twin, record):
            first_alert = run
    floor = (1 - twin.configs.monitoring.quality.recovery_tolerance) * before if before else None
    window_runs = math.ceil(
        duration_ms(twin.configs.monitoring.windows.serving)
        / twin.configs.sim_ms(twin.configs.monitoring.schedule_every)
    )
    recovery = next(
        (run for run, r, _ in ratios if first_alert is not None and run >= max(first_alert, window_runs)
         and floor is not None and r >= floor),
        None,
    )  # fmt: skip
    decisions = twin.audit[audit_from:]
    promoted = [d for d in decisions if d["kind"] == "promoted"]
    worst = min((r for _, r, _ in ratios), default=None)
    final = [r for _, r, v in ratios[-3:]]
    after = float(np.mean(final)) if final else None
    return {
        "detected": first_alert is not None,
        "delay_runs": first_alert,
        "ratio_before": before,
        "ratio_worst": worst,
        "ratio_after": after,
        "retrains": sum(1 for d in decisions if d["kind"] == "retrain_triggered"),
        "gates": [d["kind"] for d in decisions if d["kind"].startswith("gate_")],
        "ab": [d["kind"] for d in decisions if d["kind"] in ("promoted", "challenger_rejected")],
        "promoted": bool(promoted),
        "promoted_after_hours": round((promoted[0]["at"] - onset) / 3.6e6, 2) if promoted else None,
        "recovered": bool(before and after and after >= 0.95 * before),
        "recovery_runs": recovery,  # first run judging a window after the onset above the floor
        "trajectory": [(run, round(r, 4), v) for run, r, v in ratios],
    }


# --------------------------------------------------------------------------- A/A and power


def ab_experiments(
    twin: Twin, since_ms: int, plan: Plan, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A/A and power experiments on the stable phase: one model served everyone, so splitting its
    users by a fresh salt is an A/A test of the A/B rule; raising one arm's click probability by
    `lift` (extra clicks on unclicked slots with probability lift * p / (1 - p)) tests its power."""
    cfg = twin.configs.monitoring
    interval = twin.configs.sim_ms(cfg.schedule_every)
    label_delay = duration_ms(cfg.windows.label_delay)
    ends = [run.at_ms for run in twin.runs if run.at_ms > since_ms]
    served = twin.served_between(since_ms, ends[-1])
    events = twin.events_between(since_ms, ends[-1] + duration_ms(twin.configs.data.features.label_window))
    per_step = _per_user_steps(twin, served, events, since_ms, ends, label_delay)
    probability = per_step.pop("probability")
    max_looks = int(duration_ms(cfg.ab.max_duration) / interval) + 1
    rng = np.random.default_rng([seed, 4242])
    starts = rng.integers(0, max(1, len(ends) - max_looks), plan.aa_per_world + plan.power_per_world)
    aa = [_experiment(per_step, None, int(s), max_looks, f"aa-{seed}-{i}", twin, rng)
          for i, s in enumerate(starts[: plan.aa_per_world])]  # fmt: skip
    power = [
        _experiment(per_step, (probability, plan.lift), int(s), max_looks, f"pw-{seed}-{i}", twin, rng)
        for i, s in enumerate(starts[plan.aa_per_world :])
    ]
    return aa, power


def _per_user_steps(
    twin: Twin, served: pa.Table, events: pa.Table, since_ms: int, ends: list[int], label_delay: int
) -> dict[str, np.ndarray]:
    """(users x steps) sums of what the A/B rule reads, each slot counted at the first run whose
    labelled window covers it; plus each slot's true P(click) for the power experiments."""
    n_users = twin.world.n_users
    ts = served["ts"].cast(pa.int64()).to_numpy()
    step = np.searchsorted(np.asarray(ends) - label_delay, ts, side="right")
    keep = step < len(ends)
    served, step = served.filter(pa.array(keep)), step[keep]
    arms = arm_samples(  # per (user, step) clusters: encode the step into the user id
        served.set_column(
            served.schema.get_field_index("user_id"),
            "user_id",
            pa.array(served["user_id"].to_numpy() * len(ends) + step),
        ),
        events.select(["event_type", "request_id", "position"]),
    )
    sample = arms.get((CHAMPION_VARIANT, twin.champion.version))
    assert sample is not None, "the stable phase served nothing"
    users, steps = sample.users // len(ends), sample.users % len(ends)
    out = {}
    for name in ("impressions", "clicks", "hides", "top_clicks", "top_scores"):
        grid = np.zeros((n_users, len(ends)))
        np.add.at(grid, (users, steps), getattr(sample, name))
        out[name] = grid
    # the true click probability of every served slot, summed per (user, step) as p / (1 - p)
    world = twin.world
    slots_p = world.click_probability(
        served["user_id"].to_numpy(), served["item_id"].to_numpy(), served["position"].to_numpy(),
        served["ts"].cast(pa.int64()).to_numpy(),
    )  # fmt: skip
    clicked_slots = _clicked(served, events)
    odds = np.where(clicked_slots, 0.0, slots_p / np.maximum(1 - slots_p, 1e-9))
    grid = np.zeros((n_users, len(ends)))
    np.add.at(grid, (served["user_id"].to_numpy(), step), odds)
    out["probability"] = grid
    return out


def _clicked(served: pa.Table, events: pa.Table) -> np.ndarray:
    clicks = events.filter(pc.equal(events["event_type"], "click")).select(["request_id", "position"])
    slots = clicks.group_by(["request_id", "position"]).aggregate([])
    slots = slots.append_column("clicked", pa.array(np.ones(slots.num_rows, dtype=np.int8)))
    slots = slots.set_column(1, "position", pc.cast(slots["position"], served.schema.field("position").type))
    indexed = served.select(["request_id", "position"]).append_column(
        "row", pa.array(np.arange(served.num_rows))
    )
    joined = indexed.join(slots, keys=["request_id", "position"], join_type="left outer")
    out = np.zeros(served.num_rows, dtype=bool)
    out[joined["row"].to_numpy()] = pc.fill_null(joined["clicked"], 0).to_numpy().astype(bool)
    return out


def _experiment(
    per_step: dict[str, np.ndarray],
    lifted: tuple[np.ndarray, float] | None,
    start: int,
    max_looks: int,
    salt: str,
    twin: Twin,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One experiment from step `start`: users split by `salt` at the configured share; each
    following step is a look of the A/B rule, until it promotes, rejects or runs out of time."""
    cfg = twin.configs.monitoring
    share = twin.configs.serving.ab.challenger_share
    n_users = per_step["impressions"].shape[0]
    treated = np.array([ab_bucket(u, salt) < share for u in range(n_users)])
    interval = twin.configs.sim_ms(cfg.schedule_every)
    cumulative = {name: np.cumsum(grid[:, start:], axis=1) for name, grid in per_step.items()}
    extra = np.zeros_like(cumulative["clicks"])
    if lifted is not None:  # extra clicks: each unclicked slot with probability lift * p / (1 - p)
        odds, lift = lifted
        draws = rng.poisson(lift * odds[:, start:] * treated[:, None])  # sums of rare Bernoullis
        extra = np.cumsum(draws, axis=1)
    state = AbState()
    looks = min(max_looks, cumulative["impressions"].shape[1])
    for look in range(looks):
        arms = []
        for is_treatment, in_arm in ((False, ~treated), (True, treated)):
            seen = in_arm & (cumulative["impressions"][:, look] > 0)
            clicks = cumulative["clicks"][seen, look] + (extra[seen, look] if is_treatment else 0)
            arms.append(
                ArmSample(
                    np.flatnonzero(seen),
                    cumulative["impressions"][seen, look],
                    clicks,
                    cumulative["hides"][seen, look],
                    cumulative["top_clicks"][seen, look],
                    cumulative["top_scores"][seen, look],
                )
            )
        state, decision = decide_ab(state, arms[0], arms[1], (look + 1) * interval, cfg.ab)
        if decision.decision != "collecting":
            return {"decision": decision.decision, "looks": look + 1, "why": decision.why,
                    "lift": decision.figures.get("lift")}  # fmt: skip
    return {"decision": "undecided", "looks": looks, "why": "ran out of stable data", "lift": None}


# --------------------------------------------------------------------------- summary


def miss_probability(runs: list[dict[str, Any]], threshold: float, budget: int) -> float | None:
    """P(a drift like these goes undetected for `budget` runs), from the spread of the evidence:
    the CUSUM's statistic after `budget` runs is at least the sum of their log-likelihood ratios,
    which over the seeds is roughly normal, so P(miss) <= P(sum < threshold) ~ Phi((h - mean) / sd).
    None when fewer than 5 seeds carry enough runs."""
    sums = [sum(d["llr"][:budget]) for d in runs if len(d["llr"]) >= budget]
    if len(sums) < 5:
        return None
    mean, sd = float(np.mean(sums)), float(np.std(sums, ddof=1))
    if sd == 0:
        return 0.0 if mean >= threshold else 1.0
    return float(0.5 * math.erfc((mean - threshold) / (sd * math.sqrt(2))))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(results: list[WorldResult], plan: Plan, configs: Configs) -> dict[str, Any]:
    stable = sum(r.stable_runs for r in results)
    false_alarms = sum(r.false_alarm_runs for r in results)
    aa = [e for r in results for e in r.aa]
    aa_promoted = sum(1 for e in aa if e["decision"] == "promote")
    power = [e for r in results for e in r.power]
    power_promoted = sum(1 for e in power if e["decision"] == "promote")
    knobs: dict[str, Any] = {}
    for knob in (*KNOBS, SCENARIO):
        runs = [d for r in results for d in r.detection.get(knob, [])]
        detected = [d for d in runs if d["detected"]]
        loops = [r.loops[knob] for r in results if knob in r.loops]
        loop = loops[0] if loops else {}
        knobs[knob] = {
            "seeds": len(runs),
            "detected": len(detected),
            "detection_rate": len(detected) / max(len(runs), 1),
            "delay_runs": float(np.median([d["runs"] for d in detected])) if detected else None,
            "delay_runs_max": max((d["runs"] for d in detected), default=None),
            "miss_probability": miss_probability(
                runs, configs.monitoring.quality.cusum_threshold, plan.evidence_runs
            ),
            "ratio_before": loop.get("ratio_before"),
            "ratio_worst": loop.get("ratio_worst"),
            "ratio_after": loop.get("ratio_after"),
            "promoted": loop.get("promoted"),
            "recovered": loop.get("recovered"),
            "loops_promoted": sum(1 for item in loops if item["promoted"]),
            "recovery_runs_max": max(
                (item["recovery_runs"] for item in loops if item["recovery_runs"] is not None), default=None
            ),
            "loops_not_recovered": sum(1 for item in loops if item["recovery_runs"] is None),
            "loops": [{k: v for k, v in item.items() if k != "trajectory"} for item in loops],
        }
    return {
        "stable_runs": stable,
        "false_alarms": false_alarms,
        "false_alarm_rate": false_alarms / max(stable, 1),
        "false_alarm_ci": wilson(false_alarms, stable),
        "alarms_by_kind": {
            kind: sum(r.alarms.get(kind, 0) for r in results)
            for kind in {k for r in results for k in r.alarms}
        },
        "aa_experiments": len(aa),
        "aa_false_promotions": aa_promoted,
        "aa_rate_ci": wilson(aa_promoted, len(aa)),
        "aa_rejections": sum(1 for e in aa if e["decision"] == "reject"),
        "ab_alpha": configs.monitoring.ab.alpha,
        "ab_lift": plan.lift,
        "ab_power": power_promoted / max(len(power), 1),
        "ab_power_experiments": len(power),
        "ab_power_looks": float(np.median([e["looks"] for e in power if e["decision"] == "promote"]))
        if power_promoted
        else None,
        "knobs": knobs,
        "cusum_threshold": configs.monitoring.quality.cusum_threshold,
        "worlds": len(results),
        "seconds": sum(r.seconds for r in results),
    }
