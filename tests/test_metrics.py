"""cxr.metrics against hand-computed values on tiny data and brute-force reimplementations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from cxr import metrics
from cxr.metrics import (
    auprc,
    auroc,
    bootstrap_auroc_ci,
    confusion_at,
    ece,
    expected_null_psi,
    ks_statistic,
    psi,
    psi_categorical,
    sensitivity_threshold,
    youden_threshold,
)


def brute_auroc(y: Sequence[float], s: Sequence[float]) -> float:
    """Every positive-negative pair: 1 for a win, 1/2 for a tie."""
    pos = [si for yi, si in zip(y, s, strict=True) if yi == 1]
    neg = [si for yi, si in zip(y, s, strict=True) if yi == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def brute_auprc(y: Sequence[float], s: Sequence[float]) -> float:
    """Precision and recall of ``s >= t`` recounted at every distinct threshold, descending."""
    y_arr, s_arr = np.asarray(y), np.asarray(s)
    n_pos = y_arr.sum()
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s_arr.tolist()), reverse=True):
        called = s_arr >= t
        tp = (y_arr[called] == 1).sum()
        recall = tp / n_pos
        ap += (recall - prev_recall) * tp / called.sum()
        prev_recall = recall
    return float(ap)


def brute_ks(a: Sequence[float], b: Sequence[float]) -> float:
    """max |F_a(x) - F_b(x)| with each CDF recounted at every observed x."""
    return max(abs(sum(v <= x for v in a) / len(a) - sum(v <= x for v in b) / len(b)) for x in list(a) + list(b))


def _random_cases() -> list[tuple[list[int], list[float]]]:
    rng = np.random.default_rng(7)
    cases = []
    for n, decimals in [(30, 1), (57, 0), (80, 2), (200, 3)]:
        y = rng.integers(0, 2, n)
        # decimals=0 puts every score on 0, 1 or 2: heavy ties
        s = np.round(rng.random(n) * 2 + 0.5 * y, decimals)
        cases.append((y.tolist(), s.tolist()))
    return cases


CRAFTED = [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]),
    ([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]),
    ([1, 0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5, 0.5]),
    ([1, 1, 0, 0, 0, 1], [0.9, 0.1, 0.9, 0.1, 0.3, 0.3]),
    ([0, 1], [0.7, 0.2]),
]


# --- AUROC ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("y", "s"), CRAFTED + _random_cases())
def test_auroc_matches_pair_loop(y: list[int], s: list[float]) -> None:
    assert auroc(y, s) == pytest.approx(brute_auroc(y, s), abs=1e-12)


@pytest.mark.parametrize(
    ("y", "s", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9], 0.875),  # one tie counts 1/2: (1.5 + 2) / 4
        ([1, 0, 1, 0, 1], [0.5] * 5, 0.5),
        ([0, 1], [0.7, 0.2], 0.0),
        ([0, 0, 1], [0.1, 0.2, 0.3], 1.0),
    ],
)
def test_auroc_hand_computed(y: list[int], s: list[float], expected: float) -> None:
    assert auroc(y, s) == pytest.approx(expected)


@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0], []])
def test_auroc_single_class_is_none(y: list[int]) -> None:
    assert auroc(y, [0.5] * len(y)) is None


@pytest.mark.parametrize(
    ("y", "s", "message"),
    [
        ([0, 1], [0.5], "differ in length"),
        ([0, 2], [0.5, 0.6], "only 0 and 1"),
        ([0, float("nan")], [0.5, 0.6], "only 0 and 1"),
        ([0, 1], [0.5, float("nan")], "NaN"),
        ([[0, 1]], [[0.5, 0.6]], "1-D"),
    ],
)
def test_auroc_rejects_bad_input(y: list[float], s: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auroc(y, s)


# --- AUPRC ---------------------------------------------------------------------------------------------------


def test_auprc_hand_computed_with_ties() -> None:
    # thresholds 0.9: P=1, R=1/3 | 0.8 (a tie of a negative and a positive): P=2/3, R=2/3 | 0.3: R unchanged
    # | 0.1: P=3/5, R=1  ->  1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 34/45
    assert auprc([1, 0, 1, 0, 1], [0.9, 0.8, 0.8, 0.3, 0.1]) == pytest.approx(34 / 45)


@pytest.mark.parametrize(
    ("y", "s", "expected"),
    [
        ([1, 0, 1, 0], [0.5] * 4, 0.5),  # one threshold: the prevalence
        ([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], 1.0),
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 1 / 6 + 1 / 4),  # R steps 1/2 at P=1/3, 1/2 at P=1/2
    ],
)
def test_auprc_hand_computed(y: list[int], s: list[float], expected: float) -> None:
    assert auprc(y, s) == pytest.approx(expected)


@pytest.mark.parametrize(("y", "s"), CRAFTED + _random_cases())
def test_auprc_matches_threshold_loop(y: list[int], s: list[float]) -> None:
    assert auprc(y, s) == pytest.approx(brute_auprc(y, s), abs=1e-12)


def test_auprc_without_positives_is_none() -> None:
    assert auprc([0, 0, 0], [0.1, 0.2, 0.3]) is None
    assert auprc([], []) is None


# --- bootstrap CI ------------------------------------------------------------------------------------------


def _signal_data(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.4 * y, 2)
    return y, s


def test_bootstrap_ci_equals_a_loop_of_auroc_over_the_same_resamples() -> None:
    y, s = _signal_data(60)
    rng = np.random.default_rng(11)
    aucs = []
    for _ in range(300):
        idx = rng.integers(0, len(y), size=len(y))
        auc = auroc(y[idx], s[idx])
        if auc is not None:
            aucs.append(auc)
    expected = np.quantile(aucs, [0.05, 0.95])
    lo, hi = bootstrap_auroc_ci(y, s, n_boot=300, seed=11, level=0.9)
    assert (lo, hi) == pytest.approx(tuple(expected), abs=1e-12)


def test_bootstrap_ci_is_deterministic_and_contains_the_estimate() -> None:
    y, s = _signal_data()
    point = auroc(y, s)
    assert point is not None
    first = bootstrap_auroc_ci(y, s, n_boot=200, seed=5)
    assert bootstrap_auroc_ci(y, s, n_boot=200, seed=5) == first
    lo, hi = first
    assert lo is not None and hi is not None
    assert lo < point < hi
    assert bootstrap_auroc_ci(y, s, n_boot=200, seed=6) != first


def test_bootstrap_ci_narrows_with_level() -> None:
    y, s = _signal_data()
    lo95, hi95 = bootstrap_auroc_ci(y, s, n_boot=200, seed=1, level=0.95)
    lo50, hi50 = bootstrap_auroc_ci(y, s, n_boot=200, seed=1, level=0.5)
    assert lo95 is not None and hi95 is not None and lo50 is not None and hi50 is not None
    assert lo95 < lo50 < hi50 < hi95


@pytest.mark.parametrize(("y", "n_boot"), [([1, 1, 1, 1], 100), ([0, 0, 0], 100), ([0, 1, 0, 1], 0)])
def test_bootstrap_ci_none(y: list[int], n_boot: int) -> None:
    assert bootstrap_auroc_ci(y, [0.2, 0.4, 0.6, 0.8][: len(y)], n_boot=n_boot) == (None, None)


def test_bootstrap_ci_needs_half_of_the_resamples_usable() -> None:
    # two rows, one of each class: a resample has both classes with probability 1/2
    y, s = [0, 1], [0.3, 0.6]
    outcomes = set()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        usable = sum(len(set(rng.integers(0, 2, size=2).tolist())) == 2 for _ in range(4))
        ci = bootstrap_auroc_ci(y, s, n_boot=4, seed=seed)
        if usable < 2:
            assert ci == (None, None)
        else:
            assert ci == (1.0, 1.0)  # every usable resample is one row of each class, ranked right
        outcomes.add(usable >= 2)
    assert outcomes == {True, False}


def test_bootstrap_ci_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="level"):
        bootstrap_auroc_ci([0, 1], [0.1, 0.2], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_auroc_ci([0, 1], [0.1, 0.2], n_boot=-1)


# --- ECE -----------------------------------------------------------------------------------------------------


def test_ece_two_bins_hand_computed() -> None:
    # [0, 0.5): p 0.1 0.2 0.4 (mean 0.7/3), y mean 1/3 -> 3/5 * 0.1 = 0.06
    # [0.5, 1]: p 0.5 1.0 (mean 0.75; 0.5 is the lower edge, 1.0 the closed end), y mean 1 -> 2/5 * 0.25 = 0.1
    assert ece([0, 0, 1, 1, 1], [0.1, 0.2, 0.4, 0.5, 1.0], bins=2) == pytest.approx(0.16)


def test_ece_ten_bins_skips_empty_bins() -> None:
    # bins [0.3, 0.4): p 0.3 0.3, y 0 1 -> |0.5 - 0.3| * 2/3; [0.9, 1]: p 0.95, y 1 -> 0.05 * 1/3
    assert ece([0, 1, 1], [0.3, 0.3, 0.95]) == pytest.approx(0.2 * 2 / 3 + 0.05 / 3)


def test_ece_lower_edge_is_exact() -> None:
    # 0.3 and 0.35 share the bin [0.3, 0.4): |0.5 - 0.325| = 0.175 (split at 0.30000000000000004 it would be 0.475)
    assert ece([0, 1], [0.3, 0.35]) == pytest.approx(0.175)


def test_ece_perfect_calibration_and_empty() -> None:
    assert ece([0, 1, 0, 1], [0.5, 0.5, 0.0, 1.0]) == pytest.approx(0.0)
    assert ece([], []) is None


@pytest.mark.parametrize("p", [[0.2, 1.01], [-0.1, 0.5]])
def test_ece_rejects_probabilities_outside_unit_interval(p: list[float]) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ece([0, 1], p)


# --- thresholds -----------------------------------------------------------------------------------------------


def test_youden_threshold_hand_computed() -> None:
    # J at t = 0.2: 0 | 0.3: 1/2 | 0.4: 1/6 | 0.7: 2/3 | 0.9: 1/3
    assert youden_threshold([0, 1, 0, 1, 1], [0.2, 0.3, 0.4, 0.7, 0.9]) == 0.7


def test_youden_threshold_tie_goes_to_the_larger_score() -> None:
    # J at t = 0.1: 0 | 0.3: 1/3 | 0.35: 2/3 | 0.4: 1/3 | 0.6: 2/3 | 0.8: 1/3 -> 0.35 and 0.6 tie
    assert youden_threshold([0, 0, 1, 0, 1, 1], [0.1, 0.3, 0.35, 0.4, 0.6, 0.8]) == 0.6


def test_youden_threshold_single_class_is_none() -> None:
    assert youden_threshold([1, 1], [0.2, 0.4]) is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [(1.0, 0.3), (0.6, 0.7), (2 / 3, 0.7), (0.7, 0.3), (0.3, 0.9), (1 / 3, 0.9)],
)
def test_sensitivity_threshold_hand_computed(target: float, expected: float) -> None:
    # positives score 0.9, 0.7, 0.3: sensitivity 1/3, 2/3, 1; the negatives' scores never matter
    y, s = [0, 1, 0, 1, 1, 0], [0.2, 0.3, 0.4, 0.7, 0.9, 0.95]
    assert sensitivity_threshold(y, s, target=target) == expected


def test_sensitivity_threshold_exact_fraction_and_ties() -> None:
    # 25 positives at 0.04 .. 1.0: 7 / 25 reaches 0.28 at the 7th highest score, 0.76
    # (0.28 * 25 rounds to 7.000000000000001, so counting with ceil(target * n_pos) would ask for 8)
    s = [i / 25 for i in range(1, 26)]
    assert sensitivity_threshold([1] * 25, s, target=0.28) == 0.76
    # tied positives at the top: both count at t = 0.8
    assert sensitivity_threshold([1, 1, 1, 1], [0.8, 0.8, 0.5, 0.2], target=0.5) == 0.8


def test_sensitivity_threshold_none_and_bad_target() -> None:
    assert sensitivity_threshold([0, 0], [0.1, 0.2], target=0.9) is None
    for target in (0.0, 1.5):
        with pytest.raises(ValueError, match="target"):
            sensitivity_threshold([0, 1], [0.1, 0.2], target=target)


# --- confusion -----------------------------------------------------------------------------------------------


def test_confusion_at_counts_and_rates() -> None:
    y, s = [1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.2, 0.1]
    expected = {
        "tp": 1,
        "fp": 1,
        "tn": 2,
        "fn": 1,
        "sensitivity": 0.5,
        "specificity": pytest.approx(2 / 3),
        "ppv": 0.5,
        "npv": pytest.approx(2 / 3),
    }
    assert confusion_at(y, s, 0.5) == expected
    assert confusion_at(y, s, 0.6) == expected  # a score equal to the threshold is called positive


def test_confusion_at_zero_denominators_are_none() -> None:
    got = confusion_at([1, 0, 0], [0.9, 0.6, 0.1], 0.95)
    assert got == {
        "tp": 0,
        "fp": 0,
        "tn": 2,
        "fn": 1,
        "sensitivity": 0.0,
        "specificity": 1.0,
        "ppv": None,
        "npv": pytest.approx(2 / 3),
    }
    assert confusion_at([0, 0], [0.9, 0.1], 0.5)["sensitivity"] is None
    assert confusion_at([1, 1], [0.9, 0.1], 0.5)["specificity"] is None
    assert confusion_at([1, 0], [0.9, 0.8], 0.0)["npv"] is None


# --- PSI and KS ----------------------------------------------------------------------------------------------


def test_psi_identical_samples_is_zero() -> None:
    x = np.random.default_rng(0).normal(size=50)
    assert psi(x, x) == 0.0
    assert psi(x, x[::-1], bins=4) == 0.0


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        # reference [1, 2, 3, 4] with 2 bins: quantiles 1, 2.5, 4 -> bins (-inf, 2.5) and [2.5, inf), shares 1/2 1/2
        ([1, 3, 4, 5], 0.25 * math.log(3)),  # shares 1/4 3/4: (-1/4) ln(1/2) + (1/4) ln(3/2)
        ([3, 4, 5, 6], (1e-4 - 0.5) * math.log(1e-4 / 0.5) + 0.5 * math.log(2)),  # empty bin floored at eps
        ([1, 2.5], 0.0),  # 2.5 sits on the edge and falls in the upper bin
        ([1, 2.4999], (1 - 0.5) * math.log(2) + (1e-4 - 0.5) * math.log(1e-4 / 0.5)),
    ],
)
def test_psi_shifted_hand_computed(current: list[float], expected: float) -> None:
    assert psi([1, 2, 3, 4], current, bins=2) == pytest.approx(expected)


def test_psi_removes_duplicate_quantile_edges() -> None:
    # quantiles of [0, 0, 0, 0, 1, 2] at 0, 1/3, 2/3, 1 are 0, 0, 1/3, 2 -> edges -inf, 1/3, +inf
    # reference shares 4/6 2/6; current [-1, 1, 1] shares 1/3 2/3 -> (-1/3) ln(1/2) + (1/3) ln 2
    assert psi([0, 0, 0, 0, 1, 2], [-1, 1, 1], bins=3) == pytest.approx(2 / 3 * math.log(2))


def test_psi_constant_reference_is_one_bin() -> None:
    assert psi([5, 5, 5], [1, 9, 100]) == 0.0


def test_psi_empty_is_none() -> None:
    assert psi([], [1.0]) is None
    assert psi([1.0], []) is None


def test_psi_categorical_hand_computed() -> None:
    eps = 1e-4
    # ref a 1/2, b 1/4, None 1/4, c 0 -> eps; cur a 1/4, b 1/2, None 0 -> eps, c 1/4
    expected = 0.25 * math.log(2) + 0.25 * math.log(2) + 2 * (0.25 - eps) * math.log(0.25 / eps)
    assert psi_categorical(["a", "a", "b", None], ["a", "b", "b", "c"]) == pytest.approx(expected)


def test_psi_categorical_identical_mixed_types_and_empty() -> None:
    assert psi_categorical(["x", None, 1, "x"], [None, "x", "x", 1]) == 0.0
    # 1 and "1" are different categories
    assert psi_categorical([1, 1], ["1", "1"]) == pytest.approx(2 * (1 - 1e-4) * math.log(1 / 1e-4))
    assert psi_categorical([], ["a"]) is None


def test_ks_statistic_hand_computed() -> None:
    # at x = 2: F_ref 2/3, F_cur 0
    assert ks_statistic([1, 2, 3], [2.5, 3.5]) == pytest.approx(2 / 3)
    assert ks_statistic([1, 2, 3], [3, 2, 1]) == 0.0
    assert ks_statistic([0, 0], [1, 1]) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ks_statistic_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 8, 25).tolist()  # integer values: many ties within and across samples
    b = (rng.integers(0, 8, 17) + seed).tolist()
    assert ks_statistic(a, b) == pytest.approx(brute_ks(a, b))


def test_ks_statistic_empty_is_none() -> None:
    assert ks_statistic([], [1.0]) is None


def test_expected_null_psi_formula() -> None:
    assert expected_null_psi(100, 400) == pytest.approx(9 * (0.01 + 0.0025))
    assert expected_null_psi(50, 50, bins=5) == pytest.approx(4 * 0.04)
    with pytest.raises(ValueError, match="sample sizes"):
        expected_null_psi(0, 10)


def test_expected_null_psi_matches_simulated_same_distribution_psi() -> None:
    rng = np.random.default_rng(0)
    values = []
    for _ in range(200):
        value = psi(rng.normal(size=200), rng.normal(size=500))
        assert value is not None
        values.append(value)
    assert np.mean(values) == pytest.approx(expected_null_psi(200, 500), rel=0.15)


# --- small-sample PSI: pseudo counts, tails, the noise quantile ------------------------------------------
def test_psi_pseudo_count_smooths_an_empty_bin() -> None:
    ref = np.arange(10.0)  # deciles: one value per bin
    cur = np.array([1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])  # bin 0 empty, bin 1 doubled
    ref_share, cur_share = np.full(10, 0.1), np.array([0.0, 0.2, *[0.1] * 8])
    assert metrics.psi(ref, cur) == pytest.approx(
        float(np.sum((np.maximum(cur_share, 1e-4) - ref_share) * np.log(np.maximum(cur_share, 1e-4) / ref_share)))
    )
    ref_s, cur_s = np.full(10, 1.5 / 15), np.array([0.5, 2.5, *[1.5] * 8]) / 15
    assert metrics.psi(ref, cur, pseudo_count=0.5) == pytest.approx(
        float(np.sum((cur_s - ref_s) * np.log(cur_s / ref_s)))
    )
    assert metrics.psi(ref, cur, pseudo_count=0.5) < metrics.psi(ref, cur)  # type: ignore[operator]
    with pytest.raises(ValueError, match="pseudo_count"):
        metrics.psi(ref, cur, pseudo_count=-1)


def test_psi_tails_count_values_outside_the_reference_range() -> None:
    ref = np.arange(10.0)
    inside = np.arange(10.0)
    outside = np.array([*range(7), 100.0, 200.0, 300.0])  # 3 values above everything the reference saw
    assert metrics.psi(ref, inside, tails=True) == pytest.approx(0.0)
    # without tails the three land in the open top decile with 9; with tails they have a bin of their own
    ref_t = np.array([0.0, *[0.1] * 10, 0.0])
    cur_t = np.array([0.0, *[0.1] * 7, 0.0, 0.0, 0.0, 0.3])
    floor = np.maximum
    expected = float(
        np.sum((floor(cur_t, 1e-4) - floor(ref_t, 1e-4)) * np.log(floor(cur_t, 1e-4) / floor(ref_t, 1e-4)))
    )
    assert metrics.psi(ref, outside, tails=True) == pytest.approx(expected)
    assert metrics.psi(ref, outside, tails=True) > 2 * metrics.psi(ref, outside)  # type: ignore[operator]
    # a value equal to the reference maximum is inside the range
    assert metrics.psi(ref, np.array([*range(9), 9.0]), tails=True) == pytest.approx(0.0)


def test_psi_categorical_pseudo_count() -> None:
    got = metrics.psi_categorical(["a", "a", "b"], ["a", "c"], pseudo_count=0.5)
    ref = np.array([2.5, 1.5, 0.5]) / 4.5
    cur = np.array([1.5, 0.5, 1.5]) / 3.5
    assert got == pytest.approx(float(np.sum((cur - ref) * np.log(cur / ref))))


@pytest.mark.parametrize(("df", "chi2_999"), [(9, 27.877), (11, 31.264), (3, 16.266)])
def test_null_psi_quantile_is_the_scaled_chi_square_quantile(df: int, chi2_999: float) -> None:
    # chi-square 0.999 quantiles from tables; Wilson-Hilferty is within 2% for df >= 3 (1% from df 9)
    assert metrics.null_psi_quantile(10**12, 1, df=df) == pytest.approx(chi2_999, rel=0.02)
    assert metrics.null_psi_quantile(100, 50, df=df) == pytest.approx(
        metrics.null_psi_quantile(10**12, 1, df=df) * (1 / 100 + 1 / 50)
    )
    with pytest.raises(ValueError):
        metrics.null_psi_quantile(0, 5, df=df)


def test_null_psi_quantile_bounds_simulated_noise() -> None:
    rng = np.random.default_rng(7)
    q = metrics.null_psi_quantile(150, 60, df=11, p=0.99)
    sims = [metrics.psi(rng.normal(size=150), rng.normal(size=60), pseudo_count=0.5, tails=True) for _ in range(400)]
    assert np.mean(np.array(sims) > q) < 0.03  # about 1% by construction; the approximation is not exact


# --- curves: ROC on a grid, its bootstrap band, calibration bins ---------------------------------------
def _brute_roc_at(y: np.ndarray, s: np.ndarray, x: float) -> float:
    """The highest TPR over every threshold (each distinct score, and +inf) whose FPR is at most x."""
    best = 0.0
    for t in [*np.unique(s), np.inf]:
        pred = s >= t
        fpr = (pred & (y == 0)).sum() / (y == 0).sum()
        if fpr <= x + 1e-12:
            best = max(best, (pred & (y == 1)).sum() / (y == 1).sum())
    return float(best)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_on_grid_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=40)
    s = np.round(rng.random(40) + 0.3 * y, 1)  # rounded: many ties
    curve = metrics.roc_on_grid(y, s)
    assert curve is not None and len(curve) == len(metrics.ROC_GRID) == 51
    assert curve.tolist() == pytest.approx([_brute_roc_at(y, s, x) for x in metrics.ROC_GRID])
    assert curve[-1] == 1.0 and np.all(np.diff(curve) >= 0)


def test_roc_on_grid_hand_computed_and_one_class() -> None:
    curve = metrics.roc_on_grid([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert curve is not None
    assert (curve[0], curve[24], curve[25], curve[50]) == (0.5, 0.5, 1.0, 1.0)  # FPR 0, 0.48, 0.5, 1
    assert metrics.roc_on_grid([1, 1], [0.2, 0.3]) is None
    assert metrics.bootstrap_roc_band([1, 1], [0.2, 0.3]) is None


def test_bootstrap_roc_band_is_deterministic_and_brackets_the_curve() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=200)
    s = rng.random(200) + 0.5 * y
    band = metrics.bootstrap_roc_band(y, s, n_boot=300, seed=4)
    again = metrics.bootstrap_roc_band(y, s, n_boot=300, seed=4)
    assert band is not None and again is not None
    assert band[0].tolist() == again[0].tolist() and band[1].tolist() == again[1].tolist()
    curve = metrics.roc_on_grid(y, s)
    assert curve is not None
    inner = slice(5, 46)  # away from the ends, where the band may touch the curve
    assert np.all(band[0][inner] <= curve[inner]) and np.all(curve[inner] <= band[1][inner])
    assert np.all(band[1] - band[0] >= 0) and (band[1] - band[0])[inner].mean() > 0.02


def test_calibration_bins_hand_computed() -> None:
    predicted, observed, counts = metrics.calibration_bins([0, 1, 1, 0, 1], [0.05, 0.15, 0.1, 0.95, 1.0], bins=10)
    assert counts == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert predicted[0] == pytest.approx(0.05) and predicted[1] == pytest.approx(0.125) and predicted[2] is None
    assert observed[:2] == [0.0, 1.0] and observed[9] == pytest.approx(0.5) and predicted[9] == pytest.approx(0.975)
