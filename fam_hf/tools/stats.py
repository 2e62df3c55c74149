"""The statistics of paired-seed studies, in one place: Student's t, mean intervals, paired differences.

``fam-hf compare`` and ``benchmarks/generalization.py`` both compare training arms run on the same seeds: each
seed gives one difference ``arm - baseline``, and the mean of those differences gets a two-sided t-interval. This
module computes them with the standard library alone (no scipy): Student's t distribution comes from the
regularized incomplete beta function, evaluated by its continued fraction, and its quantiles by bisection
(within 1e-7 of scipy's; the tests check df=1..30 against the printed tables).

    >>> round(t_quantile(4), 4)
    2.7764
    >>> [round(v, 4) for v in mean_interval([2.0, 4.0, 6.0])]  # mean 4, sd 2, n 3: 4 -/+ t(0.975, 2) * 2 / sqrt(3)
    [4.0, -0.9683, 8.9683]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PairedDifference",
    "interval_text",
    "markdown_table",
    "mean_interval",
    "paired_difference",
    "paired_differences",
    "std",
    "t_cdf",
    "t_quantile",
]

_NORMAL_DF = 1e7  # above this many degrees of freedom, t is the normal distribution to within 1e-6


# ---- Student's t -------------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' ``betacf``)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"the incomplete beta function did not converge (a={a}, b={b}, x={x})")


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``, for ``a, b > 0`` and ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def t_cdf(t: float, df: float) -> float:
    """Return ``P(T <= t)`` for Student's t with ``df > 0`` degrees of freedom (``df`` need not be whole)."""
    if not df > 0:
        raise ValueError(f"Student's t needs df > 0; got {df}.")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if df > _NORMAL_DF:
        return _normal_cdf(t)
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(df: float, probability: float = 0.975) -> float:
    """Return the ``probability`` quantile of Student's t with ``df`` degrees of freedom.

    The default, the 97.5% quantile, is the factor of a two-sided 95% interval: ``12.706`` for df=1, ``2.776`` for
    df=4, ``2.042`` for df=30, tending to ``1.960``. Bisection on :func:`t_cdf`: within 1e-7 (relative) of scipy's
    values for probabilities from 0.6 to 0.9995 and any df.
    """
    if not df > 0:
        raise ValueError(f"Student's t needs df > 0 degrees of freedom (at least 2 values); got df={df}.")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be strictly between 0 and 1; got {probability}.")
    if probability == 0.5:
        return 0.0
    if probability < 0.5:
        return -t_quantile(df, 1.0 - probability)
    cdf = _normal_cdf if df > _NORMAL_DF else (lambda t: t_cdf(t, df))
    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if cdf(middle) < probability:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


# ---- intervals ----------------------------------------------------------------------------------------------------


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Return ``(mean, low, high)``: the mean and its two-sided t-interval (nan bounds with fewer than 2 values).

    ``low, high = mean -/+ t_quantile(n - 1, (1 + confidence) / 2) * stdev / sqrt(n)``, the sample standard deviation
    dividing by ``n - 1``.
    """
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(len(values) - 1, (1.0 + confidence) / 2.0) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def std(values: Sequence[float]) -> float:
    """Return the sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class PairedDifference:
    """The mean of per-seed differences ``arm - baseline`` over the seeds both have, with its t-interval."""

    mean: float
    low: float  # nan with fewer than 2 seeds
    high: float
    n: int
    seeds: tuple = ()
    confidence: float = 0.95

    @property
    def has_interval(self) -> bool:
        """Whether there is an interval at all (two seeds or more)."""
        return self.n >= 2 and not math.isnan(self.low)

    @property
    def interval(self) -> list[float] | None:
        """``[low, high]``, or ``None`` without an interval."""
        return [self.low, self.high] if self.has_interval else None

    @property
    def excludes_zero(self) -> bool | None:
        """``True`` when the interval lies wholly above or below 0; ``None`` without an interval."""
        if not self.has_interval:
            return None
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        """Return ``mean``, ``ci95`` (``[low, high]`` or ``None``), ``n`` and ``seeds``, as JSON takes them."""
        name = f"ci{round(100 * self.confidence):d}"
        return {"mean": _finite_or_none(self.mean), name: self.interval, "n": self.n, "seeds": list(self.seeds)}


def paired_difference(
    arm: Mapping[Hashable, float], baseline: Mapping[Hashable, float], confidence: float = 0.95
) -> PairedDifference:
    """Return the paired difference ``arm - baseline`` over the seeds (keys) both have, with its t-interval."""
    seeds = sorted(set(arm) & set(baseline), key=_sort_key)
    mean, low, high = mean_interval([arm[s] - baseline[s] for s in seeds], confidence)
    return PairedDifference(mean=mean, low=low, high=high, n=len(seeds), seeds=tuple(seeds), confidence=confidence)


def paired_differences(
    by_arm: Mapping[str, Mapping[Hashable, float]], baseline: str, confidence: float = 0.95
) -> dict[str, PairedDifference]:
    """Return, per arm of ``by_arm`` (``{arm: {seed: value}}``), its paired difference to the ``baseline`` arm.

    The baseline gets its own entry too (differences of 0 over its seeds), as every arm does; an arm sharing no seed
    with the baseline gets ``n=0`` and a nan mean.
    """
    reference = by_arm.get(baseline, {})
    return {arm: paired_difference(values, reference, confidence) for arm, values in by_arm.items()}


def interval_text(difference: PairedDifference, scale: float = 1.0, digits: int = 3, mark: bool = False) -> str:
    """Return ``+0.012 [+0.004, +0.020]`` (the mean alone without an interval); ``mark`` adds `` *`` when the
    interval excludes 0."""
    if math.isnan(difference.mean):
        return "n/a"
    mean = f"{difference.mean * scale:+.{digits}f}"
    if not difference.has_interval:
        return mean
    star = " *" if mark and difference.excludes_zero else ""
    return f"{mean} [{difference.low * scale:+.{digits}f}, {difference.high * scale:+.{digits}f}]{star}"


# ---- tables -------------------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return a GitHub markdown table; floats are shown with 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _sort_key(seed: Hashable) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))
