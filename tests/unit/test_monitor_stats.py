"""Drift statistics and the A/B test against references and against their intended behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from services.monitor.assess import Assessment, QualityFigures
from services.monitor.jobs import _alerts, click_shortfall_p
from services.monitor.stats import categorical_psi, ks_drift, psi, two_proportion_test
from shared.config import load_monitoring_config
from tests.support import REPO_ROOT


def test_psi_is_zero_for_identical_samples_and_grows_with_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 20_000)
    assert psi(reference, reference, 10) == pytest.approx(0.0, abs=1e-12)
    small = psi(reference, rng.normal(0.1, 1, 20_000), 10)
    large = psi(reference, rng.normal(0.8, 1, 20_000), 10)
    assert 0 < small < 0.1
    assert large > 0.25


def test_psi_matches_the_textbook_formula_on_hand_counts() -> None:
    reference = np.repeat([0.5, 1.5, 2.5, 3.5], 250)  # quartile edges at 1, 2, 3
    current = np.repeat([0.5, 1.5, 2.5, 3.5], [100, 200, 300, 400])
    expected = sum((c - 0.25) * np.log(c / 0.25) for c in (0.1, 0.2, 0.3, 0.4))
    assert psi(reference, current, 4) == pytest.approx(expected, rel=1e-9)


def test_categorical_psi() -> None:
    reference = np.repeat([0, 1, 2], [500, 300, 200])
    assert categorical_psi(reference, reference) == pytest.approx(0.0, abs=1e-12)
    assert categorical_psi(reference, np.repeat([0, 1, 2, 3], [100, 300, 200, 400])) > 0.25


def test_ks_statistic_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 3000), rng.normal(0.3, 1, 2000)
    result = ks_drift(a, b, alpha=0.001, min_effect=0.05)
    reference = stats.ks_2samp(a, b)
    assert result.statistic == pytest.approx(reference.statistic)
    assert result.p_value == pytest.approx(reference.pvalue)
    assert result.drifted


def test_ks_ignores_trivial_differences_in_huge_samples() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 400_000), rng.normal(0.02, 1, 400_000)
    result = ks_drift(a, b, alpha=0.001, min_effect=0.1)
    assert result.p_value < 0.001  # "significant"...
    assert not result.drifted  # ...but not drift


def test_two_proportion_test_matches_the_normal_approximation() -> None:
    result = two_proportion_test(control_hits=500, control_n=10_000, treatment_hits=580, treatment_n=10_000)
    pooled = 1080 / 20_000
    z = (0.058 - 0.05) / np.sqrt(pooled * (1 - pooled) * (2 / 10_000))
    assert result.z == pytest.approx(z)
    assert result.p_value == pytest.approx(stats.norm.sf(z))
    assert result.lift == pytest.approx(0.16)
    assert two_proportion_test(580, 10_000, 500, 10_000).p_value > 0.5  # one-sided: worse is not better


def quality_figures(clicks: int, oracle_expected_clicks: float) -> QualityFigures:
    return QualityFigures(
        variant="champion",
        model_version=1,
        impressions=clicks * 10,
        clicks=clicks,
        ctr=0.1,
        auc=0.7,
        ece_top_slot=0.01,
        oracle_auc=0.8,
        oracle_expected_clicks=oracle_expected_clicks,
        ctr_ratio=clicks / oracle_expected_clicks,
    )


def test_a_small_windows_dip_in_clicks_is_noise_a_large_windows_is_not() -> None:
    # the same 21% drop of the ratio (0.8 -> 0.63), on a baseline of 80 clicks per 100 expected
    small = click_shortfall_p(quality_figures(63, 100.0), baseline_clicks=80, baseline_expected=100.0)
    large = click_shortfall_p(
        quality_figures(6300, 10_000.0), baseline_clicks=8000, baseline_expected=10_000.0
    )
    assert small > 0.05
    assert large < 1e-6
    more = click_shortfall_p(quality_figures(90, 100.0), baseline_clicks=80, baseline_expected=100.0)
    assert more > 0.5  # more clicks than the baseline: no shortfall at all


@pytest.mark.parametrize(
    ("clicks", "expected", "baseline_clicks", "baseline_expected", "fires"),
    [
        (6300, 10_000.0, 8000, 10_000.0, True),  # ratio 0.8 -> 0.63 on thousands of clicks
        (63, 100.0, 80, 100.0, False),  # the same fall on a few dozen clicks: noise
        (78_000, 100_000.0, 80_000, 100_000.0, False),  # significant (p ~ 1e-7), but only 2.5% lower
    ],
)
def test_a_quality_alert_needs_a_large_fall_and_a_significant_one_and_shows_its_p_value(
    clicks: int, expected: float, baseline_clicks: int, baseline_expected: float, fires: bool
) -> None:
    monitoring = load_monitoring_config(REPO_ROOT / "config", "default")
    result = Assessment("monitor-x", {"start": "s", "end": "e"}, "ok", clicks * 10, champion_version=1)
    result.quality = [quality_figures(clicks, expected)]
    result.baseline_clicks, result.baseline_expected_clicks = baseline_clicks, baseline_expected
    result.baseline_ctr_ratio = baseline_clicks / baseline_expected
    result.ctr_shortfall_p = click_shortfall_p(result.quality[0], baseline_clicks, baseline_expected)

    quality_alerts = [a for a in _alerts(result, monitoring, result.window) if a["kind"] == "quality"]

    assert bool(quality_alerts) is fires
    if fires:
        assert quality_alerts[0]["severity"] == "alert"
        assert quality_alerts[0]["p_value"] == pytest.approx(result.ctr_shortfall_p)
        assert quality_alerts[0]["p_value"] < monitoring.quality.alpha
        assert quality_alerts[0]["monitor_run"] == "monitor-x"
