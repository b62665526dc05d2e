"""Drift statistics and the A/B test, vectorized with numpy and scipy.

PSI bins on the reference's quantiles (each reference bin holds about the same mass, so sparse
tails cannot dominate). The KS decision needs both significance and effect size: with tens of
thousands of rows, a KS test finds "significant" differences nobody should act on, so the
statistic must also exceed `min_effect`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

_FLOOR = 1e-4
"""Bin shares are floored so an empty bin does not make PSI infinite."""


def psi(reference: np.ndarray, current: np.ndarray, bins: int) -> float:
    """Population stability index of `current` against `reference`, bins on reference quantiles."""
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    if reference.size == 0 or current.size == 0:
        return float("nan")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_share = (
        np.bincount(np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1)
        / reference.size
    )
    cur_share = (
        np.bincount(np.searchsorted(edges, current, side="right"), minlength=edges.size + 1) / current.size
    )
    ref_share, cur_share = np.maximum(ref_share, _FLOOR), np.maximum(cur_share, _FLOOR)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def categorical_psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI over the categories seen in either sample."""
    if len(reference) == 0 or len(current) == 0:
        return float("nan")
    categories = np.union1d(reference, current)
    ref_share = np.maximum(
        np.bincount(np.searchsorted(categories, reference), minlength=categories.size) / len(reference),
        _FLOOR,
    )
    cur_share = np.maximum(
        np.bincount(np.searchsorted(categories, current), minlength=categories.size) / len(current), _FLOOR
    )
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


@dataclass(frozen=True)
class KsResult:
    statistic: float
    p_value: float
    critical: float  # the statistic a significant difference needs at this alpha and these sizes
    drifted: bool


def ks_drift(
    reference: np.ndarray,
    current: np.ndarray,
    alpha: float,
    min_effect: float,
    effective_sizes: tuple[int, int] | None = None,
) -> KsResult:
    """Two-sample KS: drift = significant at `alpha` AND a statistic of at least `min_effect`.

    `effective_sizes` replace the row counts in the test when rows are not independent: a feed
    shows the same few dozen items again and again, so an item feature has as many independent
    observations as there are distinct items, not impressions."""
    n, m = len(reference), len(current)
    if n == 0 or m == 0:
        return KsResult(float("nan"), float("nan"), float("nan"), False)
    statistic = float(stats.ks_2samp(reference, current).statistic)
    if effective_sizes is not None:
        n, m = min(n, max(effective_sizes[0], 1)), min(m, max(effective_sizes[1], 1))
    scale = math.sqrt((n + m) / (n * m))
    critical = math.sqrt(-math.log(alpha / 2) / 2) * scale
    p_value = min(1.0, 2 * math.exp(-2 * (statistic / scale) ** 2))  # asymptotic, at the sizes used
    return KsResult(statistic, p_value, critical, statistic > max(critical, min_effect))


def distinct_count(values: np.ndarray) -> int:
    """Distinct entities (item ids, user ids): the independent observations behind a sample in
    which each of them appears many times."""
    return int(np.unique(values).size)


@dataclass(frozen=True)
class ProportionTest:
    control_rate: float
    treatment_rate: float
    lift: float  # relative: treatment / control - 1
    z: float
    p_value: float  # one-sided: treatment > control


def two_proportion_test(
    control_hits: int, control_n: int, treatment_hits: int, treatment_n: int
) -> ProportionTest:
    """One-sided two-proportion z-test with the pooled standard error."""
    if control_n == 0 or treatment_n == 0:
        return ProportionTest(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))
    p1, p2 = control_hits / control_n, treatment_hits / treatment_n
    pooled = (control_hits + treatment_hits) / (control_n + treatment_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / control_n + 1 / treatment_n))
    z = (p2 - p1) / se if se > 0 else 0.0
    return ProportionTest(p1, p2, p2 / p1 - 1 if p1 > 0 else float("nan"), z, float(stats.norm.sf(z)))
