"""fam_hf.tools.stats: Student's t without scipy, mean intervals and paired differences, checked against known
values."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from fam_hf.tools import stats

# t_{0.975, df} for df = 1..30, as printed in every statistics table (three decimals).
T975_TABLE = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip
# t_{0.995, df} (two-sided 99%) for a few df, from the same tables.
T995_TABLE = {1: 63.657, 2: 9.925, 5: 4.032, 10: 3.169, 30: 2.750}


@pytest.mark.parametrize("df", range(1, 31))
def test_t_quantile_matches_the_printed_table_for_df_1_to_30(df):
    assert stats.t_quantile(df) == pytest.approx(T975_TABLE[df - 1], abs=1e-3)


@pytest.mark.parametrize(("df", "expected"), sorted(T995_TABLE.items()))
def test_t_quantile_at_another_probability(df, expected):
    assert stats.t_quantile(df, 0.995) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("probability", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_equals_the_closed_forms_of_df_1_and_2(probability):
    # df=1 is the Cauchy distribution; df=2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert stats.t_quantile(1, probability) == pytest.approx(math.tan(math.pi * (probability - 0.5)), rel=1e-9)
    a = 4 * probability * (1 - probability)
    assert stats.t_quantile(2, probability) == pytest.approx((2 * probability - 1) * math.sqrt(2 / a), rel=1e-9)


def test_t_quantile_is_symmetric_inverts_the_cdf_and_tends_to_the_normal():
    for df in (1, 3, 7.5, 40, 1e9):
        for p in (0.55, 0.8, 0.975):
            t = stats.t_quantile(df, p)
            assert stats.t_quantile(df, 1 - p) == pytest.approx(-t, rel=1e-12)
            assert stats.t_cdf(t, df) == pytest.approx(p, abs=1e-10)
    assert stats.t_quantile(1e9) == pytest.approx(1.959964, abs=1e-6)
    assert stats.t_quantile(5, 0.5) == 0.0
    for bad in (0, -1):
        with pytest.raises(ValueError, match="df"):
            stats.t_quantile(bad)
    with pytest.raises(ValueError, match="probability"):
        stats.t_quantile(3, 1.0)


def test_t_quantile_agrees_with_scipy_where_it_is_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 6, 9, 14, 29, 60, 250, 10_000):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.9995):
            assert stats.t_quantile(df, p) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-7), (df, p)


def test_mean_interval_by_hand():
    # mean 4, sample sd 2, n 3: half width t(0.975, 2) * 2 / sqrt(3) = 4.302653 * 1.154701 = 4.968275
    mean, low, high = stats.mean_interval([2.0, 4.0, 6.0])
    assert mean == 4.0
    assert low == pytest.approx(4 - 4.968275, abs=1e-6) and high == pytest.approx(4 + 4.968275, abs=1e-6)
    assert stats.mean_interval([2.0, 4.0, 6.0], confidence=0.99)[2] == pytest.approx(4 + 9.924843 * 1.154701, abs=1e-5)
    single = stats.mean_interval([3.0])
    assert single[0] == 3.0 and math.isnan(single[1]) and math.isnan(single[2])
    assert all(math.isnan(v) for v in stats.mean_interval([]))
    assert stats.std([1.0]) == 0.0 and stats.std([1.0, 3.0]) == pytest.approx(math.sqrt(2))


def test_paired_difference_by_hand():
    arm = {0: 0.80, 1: 0.75, 2: 0.90, 3: 0.70, 7: 0.99}  # seed 7: no baseline run, left out
    baseline = {0: 0.78, 1: 0.74, 2: 0.85, 3: 0.71, 4: 0.90}  # seed 4: no arm run, left out
    # differences 0.02, 0.01, 0.05, -0.01: mean 0.0175; deviations 0.0025, -0.0075, 0.0325, -0.0275,
    # squares sum to 0.001875, / 3 = 0.000625, sd 0.025, se 0.0125; t(0.975, 3) = 3.182446 -> half width 0.0397806
    d = stats.paired_difference(arm, baseline)
    assert d.n == 4 and d.seeds == (0, 1, 2, 3)
    assert d.mean == pytest.approx(0.0175)
    assert d.low == pytest.approx(0.0175 - 0.0397806, abs=1e-7) and d.high == pytest.approx(
        0.0175 + 0.0397806, abs=1e-7
    )
    assert d.excludes_zero is False
    assert d.to_dict() == {"mean": pytest.approx(0.0175), "ci95": [d.low, d.high], "n": 4, "seeds": [0, 1, 2, 3]}
    assert stats.interval_text(d, scale=100, digits=2) == "+1.75 [-2.23, +5.73]"

    # differences 0.10, 0.12, 0.08: mean 0.1, sd 0.02, se 0.011547; t(0.975, 2) = 4.302653 -> [0.050317, 0.149683]
    shifted = stats.paired_difference({0: 1.10, 1: 1.12, 2: 1.08}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert shifted.interval == pytest.approx([0.050317, 0.149683], abs=1e-6)
    assert shifted.excludes_zero is True
    assert stats.interval_text(shifted, mark=True) == "+0.100 [+0.050, +0.150] *"

    one = stats.paired_difference({0: 2.0, 1: 3.0}, {1: 1.0})
    assert one.n == 1 and one.mean == 2.0 and one.interval is None and one.excludes_zero is None
    assert one.to_dict()["ci95"] is None
    none = stats.paired_difference({0: 1.0}, {1: 1.0})
    assert none.n == 0 and none.to_dict()["mean"] is None and stats.interval_text(none) == "n/a"


def test_paired_differences_per_arm_include_the_baseline_itself():
    by_arm = {"baseline": {0: 1.0, 1: 2.0}, "a": {0: 1.5, 1: 2.5}, "b": {5: 0.0}}
    out = stats.paired_differences(by_arm, "baseline")
    assert list(out) == ["baseline", "a", "b"]
    assert (out["baseline"].mean, out["baseline"].low, out["baseline"].high) == (0.0, 0.0, 0.0)
    assert out["a"].mean == 0.5 and out["a"].interval == [0.5, 0.5]  # no spread: a degenerate interval
    assert out["b"].n == 0 and math.isnan(out["b"].mean)


def test_markdown_table():
    table = stats.markdown_table(["a", "b"], [[1, 0.123456], ["x", float("nan")]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x | nan |"]


def test_the_benchmarks_use_this_module_not_a_copy():
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    try:
        import benchmarks.common as common
    finally:
        sys.path.remove(str(root))
    for name in ("t_quantile", "mean_interval", "std", "markdown_table"):
        assert getattr(common, name) is getattr(stats, name), name
    assert not hasattr(common, "_T975")
