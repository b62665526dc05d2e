"""The monitor's decision rules on constructed data: each must decide when the data says so, and
must not decide when it does not. (Their error rates on the simulated world: the loop benchmark.)"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from services.monitor.assess import Assessment, alerts_for
from services.monitor.rules import (
    AbState,
    ArmSample,
    ChampionTrack,
    QualityBaseline,
    QualityState,
    RequestSample,
    RollbackWatch,
    TrackUpdate,
    advance_track,
    decide_ab,
    quality_look,
    stale_candidate,
)
from services.monitor.stats import ClusteredRatio, cusum_arl0, cusum_llr, cusum_update, msprt
from shared.config import AbTestConfig, QualityConfig, load_monitoring_config
from tests.support import REPO_ROOT

HOUR = 3_600_000
QUALITY = QualityConfig(
    min_impressions=1, ctr_ratio_drop_alert=0.2, cusum_threshold=12.0, recovery_tolerance=0.15
)
AB = AbTestConfig(
    min_users=100,
    alpha=0.05,
    mixture_lift=0.1,
    max_duration=timedelta(hours=12),
    hide_margin=0.1,
    calibration_tolerance=0.1,
)


def requests(
    n: int, ratio: float, expected_per_request: float = 2.0, start_ms: int = 0, span_ms: int = HOUR, seed: int = 0,
    users: int = 3000,
) -> RequestSample:  # fmt: skip
    """n requests of distinct-ish users whose clicks are Poisson around ratio * expected."""
    rng = np.random.default_rng(seed)
    expected = np.full(n, expected_per_request)
    return RequestSample(
        rng.integers(0, users, n), np.sort(rng.integers(start_ms, start_ms + span_ms, n)),
        rng.poisson(ratio * expected).astype(float), expected,
    )  # fmt: skip


BASELINE = QualityBaseline(clicks=800.0, expected=2000.0, dispersion=1.0, users=900, start_ms=0, end_ms=HOUR)


# --------------------------------------------------------------------------- statistics


def test_a_clustered_ratio_is_the_ratio_of_sums_with_the_delta_method_variance() -> None:
    sample = ClusteredRatio.of(
        np.array([1, 1, 2, 3]), np.array([1.0, 0.0, 2.0, 1.0]), np.array([2.0, 2.0, 3.0, 1.0])
    )
    assert sample.value == pytest.approx(4 / 8)
    numerator, denominator = np.array([1.0, 2.0, 1.0]), np.array([4.0, 3.0, 1.0])
    residuals = numerator - 0.5 * denominator
    assert sample.variance() == pytest.approx(3 / 2 * np.sum(residuals**2) / 64)


def test_poisson_counts_have_dispersion_one_and_clustered_users_more() -> None:
    rng = np.random.default_rng(3)
    expected = np.full(5000, 3.0)
    poisson = ClusteredRatio(rng.poisson(0.4 * expected).astype(float), expected)
    assert poisson.dispersion(0.4) == pytest.approx(1.0, abs=0.06)
    # users differ: each one's rate is 0.4 times a gamma factor of mean 1 -> more variance
    factor = rng.gamma(2.0, 0.5, 5000)
    clustered = ClusteredRatio(rng.poisson(0.4 * factor * expected).astype(float), expected)
    assert clustered.dispersion(0.4) > 1.3


def test_the_cusum_accumulates_evidence_of_a_fall_and_forgets_evidence_against_it() -> None:
    assert cusum_llr(-0.2, 0.01, 0.2) == pytest.approx(0.2 * 0.1 / 0.01)  # a fall of the design size
    assert cusum_llr(-0.1, 0.01, 0.2) == pytest.approx(0.0)  # half of it: no evidence either way
    assert cusum_llr(0.1, 0.01, 0.2) < 0  # a rise: evidence against a fall
    assert cusum_update(3.0, -5.0) == 0.0
    assert cusum_update(3.0, 2.0) == 5.0


def test_the_cusum_arl_approximation_matches_a_simulated_normal_cusum() -> None:
    rng = np.random.default_rng(11)
    step_shift, threshold = 1.5, 4.0
    lengths = []
    for _ in range(400):
        statistic, run = 0.0, 0
        while statistic < threshold:
            run += 1
            x = rng.normal(0.0, 1.0)  # no fall: x in units of its sd, the design fall is step_shift sds
            statistic = cusum_update(statistic, cusum_llr(x, 1.0, step_shift))
        lengths.append(run)
    assert cusum_arl0(threshold, step_shift) == pytest.approx(np.mean(lengths), rel=0.2)


def test_the_mixture_sprt_p_value_never_rises_and_stays_valid_under_continuous_looks() -> None:
    rng = np.random.default_rng(5)
    false_rejections = 0
    for _ in range(300):  # null experiments, each looked at 50 times
        p, total = 1.0, 0.0
        for look in range(1, 51):
            total += rng.normal(0.0, 1.0)
            test = msprt(total / look, 1.0 / look, tau=0.5, alpha=0.05, previous_p=p)
            assert test.p_value <= p
            p = test.p_value
        false_rejections += p <= 0.05
    assert false_rejections / 300 <= 0.05  # a fixed-alpha test looked at 50 times: ~30 %


def test_the_mixture_sprt_finds_a_real_difference_and_its_interval_covers_it() -> None:
    test = msprt(estimate=0.5, variance=0.01, tau=0.5, alpha=0.05)
    assert test.p_value < 0.001
    assert test.lower < 0.5 < test.upper
    assert test.lower > 0


# --------------------------------------------------------------------------- quality CUSUM


def test_a_fall_of_the_design_size_on_enough_clicks_alarms_within_a_few_runs() -> None:
    state = QualityState()
    alarms = []
    for run in range(6):
        state, look = quality_look(state, requests(500, 0.4 * 0.8, seed=run), BASELINE, QUALITY, 0, HOUR)
        alarms.append(look.alarm)
    assert any(alarms[:4])
    assert state.alarms >= 1


def test_a_level_that_holds_never_alarms_and_the_statistic_stays_near_zero() -> None:
    state = QualityState()
    for run in range(200):
        state, look = quality_look(state, requests(500, 0.4, seed=run), BASELINE, QUALITY, 0, HOUR)
        assert not look.alarm
    assert state.alarms == 0


def test_a_small_fall_does_not_alarm_and_an_alarm_resets_the_statistic() -> None:
    state = QualityState()
    for run in range(50):  # 5 %: within the noise the rule tolerates (it is tuned to 20 %)
        state, look = quality_look(state, requests(500, 0.4 * 0.95, seed=run), BASELINE, QUALITY, 0, HOUR)
        assert not look.alarm
    state, look = quality_look(QualityState(statistic=11.9), requests(500, 0.2), BASELINE, QUALITY, 0, HOUR)
    assert look.alarm
    assert state.statistic == 0.0


def test_a_look_without_expected_clicks_adds_no_evidence() -> None:
    state, look = quality_look(QualityState(statistic=4.0), RequestSample.empty(), BASELINE, QUALITY, 0, HOUR)
    assert state.statistic == 4.0
    assert not look.alarm
    assert state.last_end_ms == HOUR


def test_a_track_warms_up_measures_its_baseline_then_watches_and_counts_each_request_once() -> None:
    track, pending = ChampionTrack(version=3, first_served_ms=0), RequestSample.empty()
    warmup, baseline = 2 * HOUR, HOUR
    everything = requests(4000, 0.4, span_ms=6 * HOUR)
    phases = []
    for end in range(HOUR, 6 * HOUR + 1, HOUR // 2):
        window = everything.between(end - 3 * HOUR, end)  # windows overlap: requests seen twice
        update = advance_track(track, window, end, pending, QUALITY, warmup, baseline)
        track, pending = update.track, update.pending_baseline
        phases.append(update.phase)
        if update.baseline_established:
            assert track.baseline is not None
            in_baseline = everything.between(warmup, warmup + baseline)
            assert track.baseline.clicks == pytest.approx(in_baseline.clicks.sum())
            assert track.baseline.expected == pytest.approx(in_baseline.expected.sum())
    assert phases[0] == "warming_up"
    assert "baseline" in phases
    assert phases[-1] == "monitoring"
    assert track.cusum.looks > 0
    assert track.cusum.alarms == 0


def test_a_probation_watches_the_new_champion_against_the_champion_it_replaced_until_it_ends() -> None:
    reference = QualityBaseline(800.0, 2000.0, 1.0, 900, 0, HOUR)
    track = ChampionTrack(
        9, first_served_ms=0, rollback=RollbackWatch(8, reference, since_ms=0, until_ms=3 * HOUR)
    )
    worse = requests(3000, 0.4 * 0.5, span_ms=4 * HOUR)
    looks = []
    for end in range(HOUR, 5 * HOUR, HOUR):
        update = advance_track(track, worse, end, RequestSample.empty(), QUALITY, 10 * HOUR, HOUR)
        track = update.track
        looks.append(update.rollback)
    assert looks[0] is not None
    assert looks[0].alarm  # half the previous level: roll back
    assert looks[-1] is None  # the probation ended at 3h


def test_quality_and_regression_alarms_become_alerts_with_their_evidence() -> None:
    monitoring = load_monitoring_config(REPO_ROOT / "config", "default")
    track = ChampionTrack(1, 0, baseline=BASELINE)
    _, look = quality_look(QualityState(statistic=11.0), requests(500, 0.2), BASELINE, QUALITY, 0, HOUR)
    assert look.alarm
    result = Assessment("monitor-x", {"start": "s", "end": "e"}, "ok", 5000, champion_version=1)
    found = alerts_for(
        result, TrackUpdate(track, RequestSample.empty(), "monitoring", quality=look), monitoring
    )
    (alert,) = found
    assert (alert["severity"], alert["kind"], alert["what"]) == ("alert", "quality", "ctr_ratio")
    assert alert["reference_ratio"] == pytest.approx(BASELINE.ratio)
    assert alert["cusum"] == pytest.approx(look.statistic)
    assert alert["monitor_run"] == "monitor-x"
    quiet = TrackUpdate(track, RequestSample.empty(), "monitoring")
    assert alerts_for(result, quiet, monitoring) == []


# --------------------------------------------------------------------------- A/B


def arm(users: int, ctr: float, seed: int, impressions: int = 30, hide_rate: float = 0.01, calibration: float = 1.0,
        offset: int = 0) -> ArmSample:  # fmt: skip
    """Users with `impressions` slots each; each user's own CTR varies around `ctr`."""
    rng = np.random.default_rng(seed)
    own = np.clip(ctr * rng.gamma(4.0, 0.25, users), 0, 1)
    shown = np.full(users, float(impressions))
    clicks = rng.binomial(impressions, own).astype(float)
    top = rng.binomial(3, own).astype(float)
    return ArmSample(
        np.arange(offset, offset + users), shown, clicks, rng.binomial(impressions, hide_rate, users).astype(float),
        top, np.full(users, 3 * ctr / calibration),
    )  # fmt: skip


def test_ab_keeps_collecting_below_the_minimum_number_of_users_whatever_the_lift() -> None:
    _, decision = decide_ab(AbState(), arm(50, 0.05, 1), arm(50, 0.20, 2, offset=50), HOUR, AB)
    assert decision.decision == "collecting"


def test_a_challenger_that_never_gets_its_users_is_rejected_once_its_time_is_up() -> None:
    _, decision = decide_ab(AbState(), arm(800, 0.1, 1), ArmSample.empty(), 12 * HOUR, AB)
    assert decision.decision == "reject"
    assert "too few users" in decision.why


def test_ab_promotes_a_clearly_better_challenger_and_rejects_a_clearly_worse_one() -> None:
    _, better = decide_ab(AbState(), arm(800, 0.10, 1), arm(800, 0.13, 2, offset=800), HOUR, AB)
    assert better.decision == "promote"
    assert better.figures["p_value"] <= AB.alpha
    assert better.figures["lift_ci"][0] > 0
    _, worse = decide_ab(AbState(), arm(800, 0.13, 1), arm(800, 0.10, 2, offset=800), HOUR, AB)
    assert worse.decision == "reject"
    assert "lower" in worse.why


def test_ab_does_not_decide_between_equal_arms_until_its_maximum_duration() -> None:
    state = AbState()
    for look in range(1, 12):
        state, decision = decide_ab(state, arm(400 + 20 * look, 0.1, look), arm(400 + 20 * look, 0.1, 100 + look, offset=5000),
                                    look * HOUR, AB)  # fmt: skip
        assert decision.decision == "collecting"
    _, final = decide_ab(state, arm(700, 0.1, 7), arm(700, 0.1, 8, offset=5000), 12 * HOUR, AB)
    assert final.decision == "reject"
    assert "max_duration" in final.why


def test_ab_guardrails_reject_a_challenger_whose_users_hide_more_or_whose_scores_are_miscalibrated() -> None:
    control = arm(1500, 0.10, 1)
    hiding = arm(1500, 0.105, 2, hide_rate=0.05, offset=2000)
    _, decision = decide_ab(AbState(), control, hiding, HOUR, AB)
    assert decision.decision == "reject"
    assert "hide" in decision.why
    miscalibrated = arm(1500, 0.105, 3, calibration=2.0, offset=2000)  # predicts half the clicks it gets
    _, decision = decide_ab(AbState(), control, miscalibrated, HOUR, AB)
    assert decision.decision == "reject"
    assert "calibrated" in decision.why


# --------------------------------------------------------------------------- stale aliases


@pytest.mark.parametrize(
    ("gate_status", "age_ms", "stale"),
    [
        ("queued", 60_000, False),  # its gate is on its way
        ("running", 60_000, False),
        ("finished", 60_000, True),  # the gate clears the alias in every outcome: a leftover
        ("failed", 60_000, True),  # the gate crashed before clearing it
        (None, 60_000, True),  # no gate run at all (expired, never submitted)
        ("running", 4 * 3_600_000, True),  # a gate far beyond its time budget
    ],
)
def test_a_candidate_is_stale_once_its_gate_can_no_longer_clear_it(
    gate_status: str | None, age_ms: int, stale: bool
) -> None:
    assert (stale_candidate(gate_status, age_ms, timeout_ms=3_600_000) is not None) is stale
