"""The monitor's decision rules: pure functions of figures and state, no I/O.

Each rule states what it decides, on which unit, and the error rate it is designed for; the loop
benchmark (`python -m tests.benchmarks loop`, docs/monitoring.md) measures those rates on the
simulated world by calling these same functions.

* `quality_look`: a CUSUM over the *new* labelled requests of each monitoring run (no overlap
  between looks), of the champion's clicks per oracle-expected click against its own baseline.
  Variance from the baseline's user-level overdispersion. The threshold sets the mean number of
  runs between false alarms (`cusum_arl0`).
* `decide_ab`: a mixture SPRT on the difference in click-through rate between the challenger's
  and the champion's users (the randomised unit), always valid under continuous monitoring, with
  guardrails on hides and calibration and a maximum duration.
* `rollback_look`: after a promotion, the same CUSUM of the new champion against the previous
  champion's figures in the A/B test that promoted it.
* `stale_candidate`: a `candidate` alias nobody will ever gate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from services.monitor.stats import ClusteredRatio, SequentialTest, cusum_llr, cusum_update, msprt
from shared.config import AbTestConfig, QualityConfig

# --------------------------------------------------------------------------- quality (CUSUM)


@dataclass(frozen=True)
class RequestSample:
    """Requests with their user, time, clicks and what the oracle's own feed would have drawn."""

    users: np.ndarray
    ts: np.ndarray
    clicks: np.ndarray
    expected: np.ndarray  # oracle-expected clicks of the same slots

    def __len__(self) -> int:
        return int(self.users.size)

    def between(self, start_ms: int, end_ms: int) -> RequestSample:
        keep = (self.ts >= start_ms) & (self.ts < end_ms)
        return RequestSample(self.users[keep], self.ts[keep], self.clicks[keep], self.expected[keep])

    def by_user(self) -> ClusteredRatio:
        return ClusteredRatio.of(self.users, self.clicks, self.expected)

    @staticmethod
    def empty() -> RequestSample:
        nothing = np.zeros(0)
        return RequestSample(nothing.astype(np.int64), nothing.astype(np.int64), nothing, nothing)

    @staticmethod
    def concat(parts: list[RequestSample]) -> RequestSample:
        if not parts:
            return RequestSample.empty()
        return RequestSample(
            np.concatenate([p.users for p in parts]),
            np.concatenate([p.ts for p in parts]),
            np.concatenate([p.clicks for p in parts]),
            np.concatenate([p.expected for p in parts]),
        )


@dataclass(frozen=True)
class QualityBaseline:
    """A version's settled level: clicks per oracle-expected click, and how overdispersed its
    per-user clicks are (the variance of every later look is scaled by it)."""

    clicks: float
    expected: float
    dispersion: float
    users: int
    start_ms: int
    end_ms: int

    @property
    def ratio(self) -> float:
        return self.clicks / self.expected if self.expected > 0 else float("nan")

    @classmethod
    def from_requests(cls, sample: RequestSample, start_ms: int, end_ms: int) -> QualityBaseline:
        per_user = sample.by_user()
        ratio = per_user.value
        dispersion = per_user.dispersion(ratio) if math.isfinite(ratio) else float("nan")
        return cls(
            clicks=per_user.total,
            expected=per_user.base,
            dispersion=max(1.0, dispersion) if math.isfinite(dispersion) else 1.0,
            users=per_user.clusters,
            start_ms=start_ms,
            end_ms=end_ms,
        )


@dataclass(frozen=True)
class QualityLook:
    """One run's evidence about a fall of the level."""

    start_ms: int
    end_ms: int
    clicks: float
    expected: float
    ratio: float
    relative_change: float  # ratio / baseline ratio - 1
    variance: float  # of relative_change
    llr: float
    statistic: float  # CUSUM after this look
    threshold: float
    alarm: bool


@dataclass(frozen=True)
class QualityState:
    """The CUSUM of one model version, carried from run to run (JSON in Redis)."""

    statistic: float = 0.0
    looks: int = 0
    last_end_ms: int | None = None
    alarms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityState:
        return cls(**data)


def quality_look(
    state: QualityState,
    increment: RequestSample,
    baseline: QualityBaseline,
    config: QualityConfig,
    start_ms: int,
    end_ms: int,
) -> tuple[QualityState, QualityLook]:
    """Add one run's new requests to the CUSUM of "the ratio fell by ctr_ratio_drop_alert".

    The observation is the increment's relative change x = (C / E) / r0 - 1, approximately
    normal with variance dispersion / (r0 * E) (clicks are overdispersed Poisson counts with the
    baseline's dispersion). An alarm resets the statistic: the next alarm needs new evidence.
    A look with no expected clicks adds nothing."""
    clicks, expected = float(increment.clicks.sum()), float(increment.expected.sum())
    r0 = baseline.ratio
    if expected <= 0 or not math.isfinite(r0) or r0 <= 0:
        look = QualityLook(start_ms, end_ms, clicks, expected, float("nan"), 0.0, float("inf"), 0.0,
                           state.statistic, config.cusum_threshold, False)  # fmt: skip
        return replace(state, last_end_ms=end_ms), look
    ratio = clicks / expected
    change = ratio / r0 - 1
    variance = baseline.dispersion / (r0 * expected)
    llr = cusum_llr(change, variance, config.ctr_ratio_drop_alert)
    statistic = cusum_update(state.statistic, llr)
    alarm = statistic >= config.cusum_threshold
    look = QualityLook(start_ms, end_ms, clicks, expected, ratio, change, variance, llr, statistic,
                       config.cusum_threshold, alarm)  # fmt: skip
    new_state = QualityState(
        statistic=0.0 if alarm else statistic,
        looks=state.looks + 1,
        last_end_ms=end_ms,
        alarms=state.alarms + int(alarm),
    )
    return new_state, look


# --------------------------------------------------------------------------- A/B (mixture SPRT)


@dataclass(frozen=True)
class ArmSample:
    """Per-user sums of one arm of the experiment: the user is the randomised unit."""

    users: np.ndarray
    impressions: np.ndarray
    clicks: np.ndarray
    hides: np.ndarray
    top_clicks: np.ndarray  # clicks in the top slot ...
    top_scores: np.ndarray  # ... and the model's P(click) there: calibration

    @property
    def n_users(self) -> int:
        return int(self.users.size)

    def ctr(self) -> ClusteredRatio:
        return ClusteredRatio(self.clicks, self.impressions)

    def hide_rate(self) -> ClusteredRatio:
        return ClusteredRatio(self.hides, self.impressions)

    def calibration(self) -> ClusteredRatio:
        """Observed over predicted clicks in the top slot (1 = calibrated)."""
        return ClusteredRatio(self.top_clicks, self.top_scores)

    @staticmethod
    def empty() -> ArmSample:
        nothing = np.zeros(0)
        return ArmSample(nothing.astype(np.int64), nothing, nothing, nothing, nothing, nothing)


@dataclass(frozen=True)
class AbState:
    """Running minima of the always-valid p-values (a p-value of a mixture SPRT never rises)."""

    p_value: float = 1.0
    hide_p_value: float = 1.0
    looks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AbState:
        return cls(**data)


AbVerdict = Literal["collecting", "promote", "reject"]


@dataclass(frozen=True)
class AbDecision:
    decision: AbVerdict
    why: str
    figures: dict[str, Any] = field(default_factory=dict)


def _difference(treatment: ClusteredRatio, control: ClusteredRatio) -> tuple[float, float]:
    return treatment.value - control.value, treatment.variance() + control.variance()


def decide_ab(
    state: AbState,
    control: ArmSample,
    treatment: ArmSample,
    elapsed_ms: int,
    config: AbTestConfig,
) -> tuple[AbState, AbDecision]:
    """Promote the challenger (treatment) when its users' CTR is higher than the champion's with
    an always-valid p-value below `alpha`, and neither guardrail fails; reject it when it is
    significantly worse, when a guardrail fails, or when `max_duration` passes without a verdict.

    Error rates (two-sided mixture SPRT, any number of looks): P(promote | no difference) <=
    alpha / 2 (the promote side of a two-sided test); the benchmark measures it with A/A tests."""
    c_ctr, t_ctr = control.ctr(), treatment.ctr()
    difference, variance = _difference(t_ctr, c_ctr)
    base = c_ctr.value if math.isfinite(c_ctr.value) and c_ctr.value > 0 else float("nan")
    tau = config.mixture_lift * base if math.isfinite(base) else float("nan")
    enough = min(control.n_users, treatment.n_users) >= config.min_users
    figures: dict[str, Any] = {
        "champion_users": control.n_users,
        "challenger_users": treatment.n_users,
        "champion_impressions": int(control.impressions.sum()),
        "challenger_impressions": int(treatment.impressions.sum()),
        "champion_clicks": int(control.clicks.sum()),
        "challenger_clicks": int(treatment.clicks.sum()),
        "champion_ctr": c_ctr.value,
        "challenger_ctr": t_ctr.value,
        "lift": difference / base if math.isfinite(base) else float("nan"),
        "elapsed_ms": elapsed_ms,
        "alpha": config.alpha,
    }
    out_of_time = elapsed_ms >= int(config.max_duration.total_seconds() * 1000)
    if not enough or not math.isfinite(tau):
        figures["p_value"] = state.p_value
        if out_of_time:  # e.g. a challenger no ranker could serve: it never got its users
            return state, AbDecision("reject", "max_duration reached with too few users to judge", figures)
        return state, AbDecision("collecting", f"fewer than {config.min_users} users per arm", figures)

    main = msprt(difference, variance, tau, config.alpha, state.p_value)
    hide_diff, hide_var = _difference(treatment.hide_rate(), control.hide_rate())
    hide_tau = config.mixture_lift * max(control.hide_rate().value, 1e-6)
    hides = msprt(hide_diff - config.hide_margin * control.hide_rate().value, hide_var, hide_tau,
                  config.alpha, state.hide_p_value)  # fmt: skip
    # calibration: how far the challenger's top-slot observed/predicted clicks are from 1, minus
    # how far the champion's are (delta method: |c - 1| moves one for one with c)
    t_cal, c_cal = treatment.calibration(), control.calibration()
    calibration_gap = abs(t_cal.value - 1.0) - abs(c_cal.value - 1.0) - config.calibration_tolerance
    calibration = msprt(
        calibration_gap, t_cal.variance() + c_cal.variance(), config.mixture_lift, config.alpha
    )
    new_state = AbState(main.p_value, hides.p_value, state.looks + 1)
    figures.update(
        p_value=main.p_value,
        lift_ci=_relative_ci(main, base),
        hide_rate_champion=control.hide_rate().value,
        hide_rate_challenger=treatment.hide_rate().value,
        hide_p_value=hides.p_value,
        calibration_challenger=t_cal.value,
        calibration_champion=c_cal.value,
        looks=new_state.looks,
    )
    verdict: AbVerdict
    guardrail = _guardrail_failure(hides, calibration)
    if guardrail is not None:
        verdict, why = "reject", guardrail
    elif main.p_value <= config.alpha:
        verdict = "promote" if difference > 0 else "reject"
        why = f"challenger CTR significantly {'higher' if difference > 0 else 'lower'}"
    elif out_of_time:
        verdict, why = "reject", "max_duration reached without a significant lift"
    else:
        verdict, why = "collecting", "no significant difference yet"
    return new_state, AbDecision(verdict, why, figures)


def _relative_ci(test: SequentialTest, base: float) -> list[float]:
    return [test.lower / base, test.upper / base] if math.isfinite(test.half_width) else [-math.inf, math.inf]


def _guardrail_failure(hides: SequentialTest, calibration: SequentialTest) -> str | None:
    """Hides: the challenger's users hide significantly more than the champion's (beyond the
    margin). Calibration: the challenger's top-slot observed/predicted clicks are significantly
    further from 1 than the champion's (beyond the tolerance). Each an always-valid interval
    entirely above zero."""
    if math.isfinite(hides.half_width) and hides.lower > 0:
        return "guardrail: challenger users hide significantly more items"
    if math.isfinite(calibration.half_width) and calibration.lower > 0:
        return "guardrail: challenger scores are significantly worse calibrated"
    return None


# --------------------------------------------------------------------------- rollback, stale aliases


def rollback_look(
    state: QualityState,
    increment: RequestSample,
    reference: QualityBaseline,
    config: QualityConfig,
    start_ms: int,
    end_ms: int,
) -> tuple[QualityState, QualityLook]:
    """After a promotion: the new champion's CUSUM against the previous champion's level in the
    A/B test that promoted it (same statistic and threshold as the quality alert). An alarm means
    the promotion made users worse off: roll back."""
    return quality_look(state, increment, reference, config, start_ms, end_ms)


def stale_candidate(gate_status: str | None, age_ms: int, timeout_ms: int) -> str | None:
    """Why a `candidate` alias will never be gated, or None while its gate may still come.

    The gate clears the alias in every outcome; an alias outliving its gate run (finished,
    failed, expired) or the gate's whole time budget is left over by a crash or a timeout."""
    if gate_status in ("finished", "failed"):
        return f"its gate run is {gate_status} but the alias is still set"
    if gate_status is None:
        return "no gate run exists for it (expired or never submitted)"
    if age_ms > timeout_ms:
        return f"it has waited {age_ms / 1000:.0f} s for its gate, longer than {timeout_ms / 1000:.0f} s"
    return None


# --------------------------------------------------------------------------- a champion's track


@dataclass(frozen=True)
class RollbackWatch:
    """A promotion on probation: the champion it replaced, and that champion's level in the A/B."""

    previous_version: int
    reference: QualityBaseline
    since_ms: int
    until_ms: int
    cusum: QualityState = QualityState()


@dataclass(frozen=True)
class ChampionTrack:
    """What the monitor knows about one version's time as champion, carried from run to run.

    Phases by sim time since it started serving as champion: warming up (its own ranking
    policy has not yet filled the feature windows), baseline (its level is being measured), then
    monitoring (each run's new requests go into the CUSUM)."""

    version: int
    first_served_ms: int
    baseline: QualityBaseline | None = None
    cusum: QualityState = QualityState()
    seen_until_ms: int | None = None  # requests before this were already counted
    rollback: RollbackWatch | None = None

    def warmup_end_ms(self, warmup_ms: int) -> int:
        return self.first_served_ms + warmup_ms

    def phase(self, window_end_ms: int, warmup_ms: int, baseline_ms: int) -> str:
        if self.baseline is not None:
            return "monitoring"
        if window_end_ms < self.warmup_end_ms(warmup_ms):
            return "warming_up"
        return "baseline" if window_end_ms < self.warmup_end_ms(warmup_ms) + baseline_ms else "monitoring"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChampionTrack:
        data = dict(data)
        baseline = data.pop("baseline")
        rollback = data.pop("rollback")
        cusum = QualityState.from_dict(data.pop("cusum"))
        watch = None
        if rollback is not None:
            watch = RollbackWatch(
                previous_version=rollback["previous_version"],
                reference=QualityBaseline(**rollback["reference"]),
                since_ms=rollback["since_ms"],
                until_ms=rollback["until_ms"],
                cusum=QualityState.from_dict(rollback["cusum"]),
            )
        return cls(
            **data,
            baseline=QualityBaseline(**baseline) if baseline is not None else None,
            cusum=cusum,
            rollback=watch,
        )


@dataclass(frozen=True)
class TrackUpdate:
    track: ChampionTrack
    pending_baseline: RequestSample  # requests collected for a baseline still being measured
    phase: str
    quality: QualityLook | None = None
    rollback: QualityLook | None = None
    baseline_established: bool = False


def advance_track(
    track: ChampionTrack,
    requests: RequestSample,
    window_end_ms: int,
    pending_baseline: RequestSample,
    config: QualityConfig,
    warmup_ms: int,
    baseline_ms: int,
) -> TrackUpdate:
    """Take one run's labelled requests of the champion: the part not yet counted goes to the
    baseline while it is being measured, then into the quality CUSUM; during a probation also
    into the rollback CUSUM. Requests are counted once however the runs' windows overlap."""
    start = track.seen_until_ms if track.seen_until_ms is not None else track.first_served_ms
    new = requests.between(start, window_end_ms)
    baseline_start = track.warmup_end_ms(warmup_ms)
    baseline_end = baseline_start + baseline_ms
    baseline, pending, established = track.baseline, pending_baseline, False
    if baseline is None:
        pending = RequestSample.concat([pending, new.between(baseline_start, baseline_end)])
        if window_end_ms >= baseline_end:
            baseline = QualityBaseline.from_requests(pending, baseline_start, baseline_end)
            pending, established = RequestSample.empty(), True
    cusum, quality = track.cusum, None
    if baseline is not None:
        look_start = max(start, baseline_end)
        cusum, quality = quality_look(
            cusum, new.between(look_start, window_end_ms), baseline, config, look_start, window_end_ms
        )
    watch, rollback = track.rollback, None
    if watch is not None and start < watch.until_ms:
        look_start = max(start, watch.since_ms)
        look_end = min(window_end_ms, watch.until_ms)
        watched, rollback = rollback_look(
            watch.cusum, new.between(look_start, look_end), watch.reference, config, look_start, look_end
        )
        watch = replace(watch, cusum=watched)
    new_track = replace(track, baseline=baseline, cusum=cusum, seen_until_ms=window_end_ms, rollback=watch)
    return TrackUpdate(
        new_track,
        pending,
        track.phase(window_end_ms, warmup_ms, baseline_ms),
        quality,
        rollback,
        established,
    )
