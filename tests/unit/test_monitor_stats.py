"""Drift statistics against references and against their intended behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from services.monitor.stats import categorical_psi, ks_drift, psi


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
