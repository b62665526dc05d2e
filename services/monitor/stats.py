"""The statistics behind the monitor's decisions, vectorized with numpy and scipy. No I/O.

* Drift: PSI bins on the reference's quantiles (each reference bin holds about the same mass, so
  sparse tails cannot dominate). The KS decision needs both significance and effect size: with
  tens of thousands of rows, a KS test finds "significant" differences nobody should act on.
* Ratios of sums (clicks per oracle-expected click, clicks per impression) over *clusters*: the
  user is the unit whose rows are dependent (the same tastes, the same session), so variances
  come from per-user sums (the delta method, linearised at the ratio), never from rows as if
  they were independent Bernoulli draws.
* Repeated looks: the quality monitor is a CUSUM (Page) of log-likelihood ratios, whose threshold
  sets the mean number of runs between false alarms; the A/B test is a mixture SPRT (Robbins;
  Johari et al., "Always valid inference", 2017) whose p-value and confidence sequence stay
  valid however often they are looked at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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
    statistic = ks_statistic(reference, current)
    if effective_sizes is not None:
        n, m = min(n, max(effective_sizes[0], 1)), min(m, max(effective_sizes[1], 1))
    scale = math.sqrt((n + m) / (n * m))
    critical = math.sqrt(-math.log(alpha / 2) / 2) * scale
    p_value = min(1.0, 2 * math.exp(-2 * (statistic / scale) ** 2))  # asymptotic, at the sizes used
    return KsResult(statistic, p_value, critical, statistic > max(critical, min_effect))


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> float:
    """The two-sample KS statistic, sup |F_ref - F_cur| (scipy's, without its exact p-value, which
    costs milliseconds per call and is computed here at the entities' count instead)."""
    a, b = np.sort(np.asarray(reference, np.float64)), np.sort(np.asarray(current, np.float64))
    points = np.concatenate([a, b])
    gap = (
        np.searchsorted(a, points, side="right") / a.size - np.searchsorted(b, points, side="right") / b.size
    )
    return float(np.max(np.abs(gap)))


def distinct_count(values: np.ndarray) -> int:
    """Distinct entities (item ids, user ids): the independent observations behind a sample in
    which each of them appears many times."""
    return int(np.unique(values).size)


# --------------------------------------------------------------------------- ratios over clusters


@dataclass(frozen=True)
class ClusteredRatio:
    """Σ numerator / Σ denominator with one row per independent cluster (a user)."""

    numerator: np.ndarray
    denominator: np.ndarray

    @classmethod
    def of(cls, clusters: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> ClusteredRatio:
        """Per-cluster sums of row-level values (rows of the same cluster may be anywhere)."""
        if len(clusters) == 0:
            return cls(np.zeros(0), np.zeros(0))
        _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
        return cls(
            np.bincount(inverse, weights=np.asarray(numerator, dtype=np.float64)),
            np.bincount(inverse, weights=np.asarray(denominator, dtype=np.float64)),
        )

    @property
    def clusters(self) -> int:
        return int(self.numerator.size)

    @property
    def total(self) -> float:
        return float(self.numerator.sum())

    @property
    def base(self) -> float:
        return float(self.denominator.sum())

    @property
    def value(self) -> float:
        return self.total / self.base if self.base > 0 else float("nan")

    def variance(self) -> float:
        """Delta-method variance of the ratio with cluster-robust residuals (n / (n - 1) corrected)."""
        n = self.clusters
        if n < 2 or self.base <= 0:
            return float("inf")
        residuals = self.numerator - self.value * self.denominator
        return float(n / (n - 1) * np.sum(residuals**2) / self.base**2)

    def dispersion(self, ratio: float) -> float:
        """Variance of the numerator per unit of its expectation, against `ratio`: 1 for Poisson
        counts, more when clusters differ (overdispersion). Scales the variance of any later
        sample of the same process: var(Σ numerator) = dispersion * ratio * Σ denominator."""
        expected = ratio * self.denominator
        if self.clusters < 2 or expected.sum() <= 0:
            return float("nan")
        n = self.clusters
        return float(n / (n - 1) * np.sum((self.numerator - expected) ** 2) / expected.sum())


# --------------------------------------------------------------------------- CUSUM


def cusum_llr(relative_change: float, variance: float, shift: float) -> float:
    """Log-likelihood ratio of one observation x of a relative change (normal, known variance)
    for "the level fell by `shift`" against "no change": N(x; -shift, v) / N(x; 0, v)."""
    if not math.isfinite(variance) or variance <= 0:
        return 0.0
    return -shift * (relative_change + shift / 2) / variance


def cusum_update(statistic: float, llr: float) -> float:
    """Page's CUSUM: accumulate evidence for a fall, forget evidence against it (floor at 0)."""
    return max(0.0, statistic + llr)


def cusum_arl0(threshold: float, step_shift: float) -> float:
    """Siegmund's approximation of the mean number of looks between false alarms of a normal
    CUSUM with threshold `threshold` (log-likelihood units) when each look's standardised shift
    (shift / sd) is `step_shift`. The benchmark measures the real rate; this is the design value."""
    if step_shift <= 0:
        return float("inf")
    k = step_shift / 2
    b = threshold / step_shift + 1.166  # threshold in sd units of the drift-corrected sum, plus overshoot
    return float((math.exp(2 * k * b) - 2 * k * b - 1) / (2 * k**2))


# --------------------------------------------------------------------------- mixture SPRT


@dataclass(frozen=True)
class SequentialTest:
    """One look of a two-sided mixture SPRT on a difference of means (normal approximation)."""

    estimate: float
    variance: float
    log_likelihood_ratio: float
    p_value: float  # always valid: the running minimum over looks
    half_width: float  # of the always-valid confidence interval at the test's alpha

    @property
    def lower(self) -> float:
        return self.estimate - self.half_width

    @property
    def upper(self) -> float:
        return self.estimate + self.half_width


def msprt(
    estimate: float, variance: float, tau: float, alpha: float, previous_p: float = 1.0
) -> SequentialTest:
    """Mixture SPRT with a N(0, tau^2) mixture over the true difference.

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2))). Under no difference,
    P(Lambda ever exceeds 1 / alpha) <= alpha, so p = min over looks of 1 / Lambda is a p-value
    one may watch continuously, and {theta : Lambda(d - theta) < 1 / alpha} a confidence
    sequence. tau is the size of difference the test is most sensitive to."""
    if not (math.isfinite(estimate) and math.isfinite(variance)) or variance <= 0 or tau <= 0:
        return SequentialTest(estimate, variance, 0.0, min(previous_p, 1.0), float("inf"))
    spread = variance + tau**2
    log_lr = 0.5 * math.log(variance / spread) + tau**2 * estimate**2 / (2 * variance * spread)
    p_value = min(previous_p, 1.0, math.exp(-log_lr) if log_lr < 700 else 0.0)
    bound = math.log(1 / alpha) + 0.5 * math.log(spread / variance)
    half_width = math.sqrt(2 * variance * spread / tau**2 * bound)
    return SequentialTest(estimate, variance, log_lr, p_value, half_width)
