"""Binary-classifier evaluation and drift metrics, pure numpy.

Labels ``y`` are 0/1, scores ``s`` are floats (higher means more likely positive); both are 1-D and of equal
length. Dropping NaN rows is the caller's job: NaN labels or scores raise ``ValueError`` rather than being
counted.

- AUROC: Mann-Whitney U / (n_pos * n_neg), a positive-negative tie counting one half.
- AUPRC: average precision, sum over distinct thresholds (descending) of (R_k - R_{k-1}) * P_k.
- Bootstrap CI: percentile interval of AUROC over resamples drawn with replacement.
- ECE: sum over equal-width probability bins of (n_bin / n) * |mean(y) - mean(p)|.
- Youden threshold: the observed score t maximizing sensitivity + specificity - 1 for ``s >= t``.
- Sensitivity threshold: the largest observed score t whose sensitivity for ``s >= t`` reaches a target.
- PSI: sum over bins of (cur - ref) * ln(cur / ref) of the two samples' shares per bin.
- KS: two-sample Kolmogorov-Smirnov D = max |F_ref(x) - F_cur(x)| over the observed values.
- Expected null PSI: (bins - 1) * (1 / n_ref + 1 / n_cur), the PSI of two samples of one distribution.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ROC_GRID",
    "auprc",
    "auroc",
    "bootstrap_auroc_ci",
    "bootstrap_roc_band",
    "calibration_bins",
    "confusion_at",
    "ece",
    "expected_null_psi",
    "ks_statistic",
    "null_psi_quantile",
    "psi",
    "psi_categorical",
    "roc_on_grid",
    "sensitivity_threshold",
    "youden_threshold",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def _as_1d(x: ArrayLike, name: str) -> FloatArray:
    """``x`` as a 1-D float64 array; ValueError for another shape or a NaN."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} holds NaN: drop those rows before computing metrics")
    return arr


def _labels_scores(y: ArrayLike, s: ArrayLike, s_name: str = "s") -> tuple[NDArray[np.bool_], FloatArray]:
    """Validated labels (as bool) and scores of equal length."""
    y_arr = np.asarray(y, dtype=float)
    if y_arr.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {y_arr.shape}")
    s_arr = _as_1d(s, s_name)
    if len(y_arr) != len(s_arr):
        raise ValueError(f"y and {s_name} differ in length: {len(y_arr)} != {len(s_arr)}")
    if not np.isin(y_arr, (0.0, 1.0)).all():
        bad = np.unique(y_arr[~np.isin(y_arr, (0.0, 1.0))])[:5]
        raise ValueError(f"y must hold only 0 and 1, found {bad.tolist()}")
    return y_arr == 1.0, s_arr


def _group_counts(positive: NDArray[np.bool_], s: FloatArray) -> tuple[FloatArray, IntArray, IntArray, IntArray]:
    """Distinct scores (ascending), each element's group index, and positives and negatives per group."""
    uniq, inverse = np.unique(s, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    pos = np.bincount(inverse[positive], minlength=len(uniq)).astype(np.int64)
    neg = np.bincount(inverse[~positive], minlength=len(uniq)).astype(np.int64)
    return uniq, inverse, pos, neg


def auroc(y: ArrayLike, s: ArrayLike) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic, from average ranks in O(n log n).

    Args:
        y: 0/1 labels.
        s: scores, higher meaning more likely positive.

    Returns:
        U / (n_pos * n_neg), where a positive scored equal to a negative counts one half; None when either
        class is empty.
    """
    positive, s_arr = _labels_scores(y, s)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, pos, neg = _group_counts(positive, s_arr)
    size = pos + neg
    # the average 1-based rank of a tie group is (elements below it) + (size + 1) / 2
    avg_rank = (np.cumsum(size) - size) + (size + 1) / 2.0
    rank_sum_pos = float(np.dot(pos, avg_rank))
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def auprc(y: ArrayLike, s: ArrayLike) -> float | None:
    """Average precision (the definition of scikit-learn's ``average_precision_score``).

    Args:
        y: 0/1 labels.
        s: scores, higher meaning more likely positive.

    Returns:
        The sum over distinct score thresholds t, descending, of (R_k - R_{k-1}) * P_k, where P_k and R_k are
        precision and recall of ``s >= t`` (tied scores form one threshold, R_0 = 0); None when there are no
        positives.
    """
    positive, s_arr = _labels_scores(y, s)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    _, _, pos, neg = _group_counts(positive, s_arr)
    # thresholds descending: cumulate the groups from the highest score down
    tp = np.cumsum(pos[::-1])
    predicted = np.cumsum((pos + neg)[::-1])
    precision = tp / predicted
    recall = tp / n_pos
    d_recall = np.diff(recall, prepend=0.0)
    return float(np.dot(d_recall, precision))


def _auroc_from_counts(pos: FloatArray, neg: FloatArray) -> float | None:
    """AUROC from positive and negative counts per tie group (groups in ascending score order)."""
    n_pos = pos.sum()
    n_neg = neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.cumsum(neg) - neg
    return float(np.dot(pos, below + 0.5 * neg) / (n_pos * n_neg))


def bootstrap_auroc_ci(
    y: ArrayLike,
    s: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float | None, float | None]:
    """Percentile bootstrap confidence interval of the AUROC.

    Resample ``b`` takes ``numpy.random.default_rng(seed).integers(0, n, size=n)`` (one call per resample, in
    order) as row indices. Each resample's AUROC is computed from per-tie-group counts (a ``bincount`` of the
    resampled rows, O(n) without a sort), equal to ``auroc`` of the resampled rows.

    Args:
        y: 0/1 labels.
        s: scores, higher meaning more likely positive.
        n_boot: number of resamples.
        seed: seed of ``numpy.random.default_rng``.
        level: coverage of the interval, in (0, 1).

    Returns:
        The (lower, upper) percentiles of the usable resamples' AUROCs at (1 - level) / 2 and
        1 - (1 - level) / 2 (numpy's default linear interpolation). Resamples holding a single class are
        skipped; (None, None) when n_boot is 0, when a class is empty, or when fewer than half of the
        resamples are usable.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    positive, s_arr = _labels_scores(y, s)
    n = len(positive)
    n_pos = int(positive.sum())
    if n_boot == 0 or n_pos == 0 or n_pos == n:
        return None, None
    aucs = [
        auc
        for pos, neg in _resampled_counts(positive, s_arr, n_boot=n_boot, seed=seed)
        if (auc := _auroc_from_counts(pos, neg)) is not None
    ]
    if len(aucs) < n_boot / 2:
        return None, None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(aucs), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _resampled_counts(
    positive: NDArray[np.bool_], s: FloatArray, *, n_boot: int, seed: int
) -> Iterator[tuple[FloatArray, FloatArray]]:
    """Per bootstrap resample, positives and negatives per tie group (ascending scores).

    Resample ``b`` takes ``numpy.random.default_rng(seed).integers(0, n, size=n)`` (one call per resample, in
    order) as row indices; its counts are a ``bincount`` of the resampled rows (O(n), no sort).
    """
    n = len(positive)
    _, inverse, _, _ = _group_counts(positive, s)
    n_groups = int(inverse.max()) + 1
    # one bincount key per row: even = negative, odd = positive, of its tie group
    key = 2 * inverse + positive.astype(np.int64)
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        counts = np.bincount(key[rng.integers(0, n, size=n)], minlength=2 * n_groups).astype(float)
        yield counts[1::2], counts[0::2]


def ece(y: ArrayLike, p: ArrayLike, *, bins: int = 10) -> float | None:
    """Expected calibration error over equal-width probability bins.

    Args:
        y: 0/1 labels.
        p: predicted probabilities in [0, 1].
        bins: number of equal-width bins on [0, 1]; bin i holds i / bins <= p < (i + 1) / bins, the last one
            also 1.0.

    Returns:
        The sum over non-empty bins of (n_bin / n) * |mean(y in bin) - mean(p in bin)|; None when n == 0.

    Raises:
        ValueError: for a probability outside [0, 1], or bins < 1.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    positive, p_arr = _labels_scores(y, p, s_name="p")
    n = len(p_arr)
    if n == 0:
        return None
    outside = (p_arr < 0.0) | (p_arr > 1.0)
    if outside.any():
        raise ValueError(f"probabilities must lie in [0, 1], found {p_arr[outside][:5].tolist()}")
    # i / bins rounded once, so p = 0.3 meets the edge 0.3 (np.linspace gives 0.30000000000000004)
    edges = np.arange(bins + 1) / bins
    which = np.minimum(np.searchsorted(edges, p_arr, side="right") - 1, bins - 1)
    n_bin = np.bincount(which, minlength=bins)
    sum_y = np.bincount(which, weights=positive.astype(float), minlength=bins)
    sum_p = np.bincount(which, weights=p_arr, minlength=bins)
    filled = n_bin > 0
    gap = np.abs(sum_y[filled] - sum_p[filled]) / n_bin[filled]
    return float(np.dot(n_bin[filled] / n, gap))


def youden_threshold(y: ArrayLike, s: ArrayLike) -> float | None:
    """The observed score maximizing Youden's J = sensitivity + specificity - 1 for the decision ``s >= t``.

    J is compared exactly (in integer arithmetic); among thresholds with equal J the larger one wins, i.e.
    the more specific operating point.

    Args:
        y: 0/1 labels.
        s: scores, higher meaning more likely positive.

    Returns:
        The threshold t among the distinct observed scores; None when a class is empty.
    """
    positive, s_arr = _labels_scores(y, s)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    uniq, _, pos, neg = _group_counts(positive, s_arr)
    pos_at_or_above = n_pos - (np.cumsum(pos) - pos)
    neg_below = np.cumsum(neg) - neg
    # J * n_pos * n_neg, exact in integers
    j_scaled = pos_at_or_above * n_neg + neg_below * n_pos
    best = len(j_scaled) - 1 - int(np.argmax(j_scaled[::-1]))
    return float(uniq[best])


def sensitivity_threshold(y: ArrayLike, s: ArrayLike, *, target: float) -> float | None:
    """The largest observed score whose sensitivity for the decision ``s >= t`` reaches a target.

    Args:
        y: 0/1 labels.
        s: scores, higher meaning more likely positive.
        target: the sensitivity to reach, in (0, 1]; compared as ``tp / n_pos >= target``.

    Returns:
        The largest observed score t with sensitivity(t) >= target (always a positive's score); None when
        there are no positives.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must lie in (0, 1], got {target}")
    positive, s_arr = _labels_scores(y, s)
    pos_scores = np.sort(s_arr[positive])[::-1]
    n_pos = len(pos_scores)
    if n_pos == 0:
        return None
    # the k highest positive scores give sensitivity >= k / n_pos at t = the k-th of them (ties only add)
    sens = np.arange(1, n_pos + 1) / n_pos
    k = int(np.argmax(sens >= target))
    return float(pos_scores[k])


def confusion_at(y: ArrayLike, s: ArrayLike, threshold: float) -> dict[str, float | int | None]:
    """Confusion counts and rates of the decision ``s >= threshold``.

    Args:
        y: 0/1 labels.
        s: scores, higher meaning more likely positive.
        threshold: scores at or above it are called positive.

    Returns:
        ``tp``, ``fp``, ``tn``, ``fn`` (ints) and ``sensitivity``, ``specificity``, ``ppv``, ``npv`` (floats,
        None where the denominator is 0).
    """
    positive, s_arr = _labels_scores(y, s)
    called = s_arr >= threshold
    tp = int(np.sum(positive & called))
    fp = int(np.sum(~positive & called))
    tn = int(np.sum(~positive & ~called))
    fn = int(np.sum(positive & ~called))

    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def _psi_from_shares(ref: FloatArray, cur: FloatArray, eps: float) -> float:
    """PSI of two share vectors over the same bins, each share floored at eps."""
    ref = np.maximum(ref, eps)
    cur = np.maximum(cur, eps)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def psi(
    reference: ArrayLike,
    current: ArrayLike,
    *,
    bins: int = 10,
    eps: float = 1e-4,
    pseudo_count: float = 0.0,
    tails: bool = False,
) -> float | None:
    """Population stability index of a numeric column over the reference's quantile bins.

    The bin edges are ``np.quantile(reference, [0, 1/bins, ..., 1])`` with duplicates removed; the lowest
    and highest edge are then opened to -inf and +inf, and a value equal to an inner edge falls in the bin
    above it. A constant reference therefore gives one bin and PSI 0: quantile bins cannot see a move away
    from a point mass (``ks_statistic`` or ``psi_categorical`` can).

    Args:
        reference: the baseline sample.
        current: the sample compared with it.
        bins: number of quantile bins before duplicate edges are merged.
        eps: floor of each bin's share, so an empty bin gives a finite term.
        pseudo_count: added to every bin's count before the shares are taken (0.5: Jeffreys smoothing).
            Without it one bin left empty by chance in a small sample adds ~0.7 (share 0.1 against the
            eps floor); with it PSI follows its chi-square approximation (:func:`null_psi_quantile`).
        tails: two more bins, for values below the reference's minimum and above its maximum: mass
            moving outside the reference's range (e.g. inverted images) counts fully instead of being
            absorbed by the open outer bins (bins + 1 degrees of freedom instead of bins - 1).

    Returns:
        sum((cur - ref) * ln(cur / ref)) over the bins' shares; None when either sample is empty.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    ref = _as_1d(reference, "reference")
    cur = _as_1d(current, "current")
    if len(ref) == 0 or len(cur) == 0:
        return None
    edges = np.unique(np.quantile(ref, np.arange(bins + 1) / bins))
    inner = edges[1:-1]  # the outer edges become -inf / +inf
    if tails:  # below the minimum and above the maximum are bins of their own
        inner = np.concatenate([[edges[0]], inner, [np.nextafter(edges[-1], np.inf)]])
    n_bins = len(inner) + 1
    if pseudo_count < 0:
        raise ValueError(f"pseudo_count must be >= 0, got {pseudo_count}")
    ref_count = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=n_bins) + pseudo_count
    cur_count = np.bincount(np.searchsorted(inner, cur, side="right"), minlength=n_bins) + pseudo_count
    return _psi_from_shares(ref_count / ref_count.sum(), cur_count / cur_count.sum(), eps)


def psi_categorical(
    reference: Iterable[Hashable], current: Iterable[Hashable], *, eps: float = 1e-4, pseudo_count: float = 0.0
) -> float | None:
    """Population stability index of a categorical column.

    Args:
        reference: the baseline values (strings, ints, None, ...; None is a category of its own).
        current: the values compared with them.
        eps: floor of each category's share, so a category missing from one side gives a finite term.
        pseudo_count: added to every category's count on both sides before the shares are taken.

    Returns:
        sum((cur - ref) * ln(cur / ref)) over the union of categories' shares; None when either is empty.
    """
    ref_counts = Counter(reference)
    cur_counts = Counter(current)
    n_ref = sum(ref_counts.values())
    n_cur = sum(cur_counts.values())
    if n_ref == 0 or n_cur == 0:
        return None
    if pseudo_count < 0:
        raise ValueError(f"pseudo_count must be >= 0, got {pseudo_count}")
    categories = list(ref_counts) + [c for c in cur_counts if c not in ref_counts]
    ref_count = np.array([ref_counts[c] + pseudo_count for c in categories])
    cur_count = np.array([cur_counts[c] + pseudo_count for c in categories])
    return _psi_from_shares(ref_count / ref_count.sum(), cur_count / cur_count.sum(), eps)


def ks_statistic(reference: ArrayLike, current: ArrayLike) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic.

    Args:
        reference: one sample.
        current: the other sample.

    Returns:
        D = max |F_ref(x) - F_cur(x)| over every observed x of both samples, F being the empirical CDFs
        (P(X <= x)); None when either sample is empty.
    """
    ref = np.sort(_as_1d(reference, "reference"))
    cur = np.sort(_as_1d(current, "current"))
    if len(ref) == 0 or len(cur) == 0:
        return None
    x = np.concatenate([ref, cur])
    f_ref = np.searchsorted(ref, x, side="right") / len(ref)
    f_cur = np.searchsorted(cur, x, side="right") / len(cur)
    return float(np.max(np.abs(f_ref - f_cur)))


def expected_null_psi(n_ref: int, n_cur: int, *, bins: int = 10) -> float:
    """The PSI expected between two samples of one and the same distribution.

    Sampling noise alone gives PSI about (bins - 1) * (1 / n_ref + 1 / n_cur) (PSI is approximately a
    chi-square statistic scaled by 1 / n_ref + 1 / n_cur, with bins - 1 degrees of freedom). A PSI threshold
    must be well above this to mean anything: for 100 reference and 100 current rows with 10 bins it is
    0.18, above the customary 0.1 "moderate shift" line.

    Args:
        n_ref: rows of the reference sample.
        n_cur: rows of the current sample.
        bins: number of bins.

    Returns:
        (bins - 1) * (1 / n_ref + 1 / n_cur).
    """
    if n_ref < 1 or n_cur < 1:
        raise ValueError(f"sample sizes must be >= 1, got n_ref={n_ref}, n_cur={n_cur}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return (bins - 1) * (1.0 / n_ref + 1.0 / n_cur)


def null_psi_quantile(n_ref: int, n_cur: int, *, df: int, p: float = 0.999) -> float:
    """The PSI that two samples of one distribution exceed with probability ``1 - p`` (sampling noise).

    PSI is approximately chi-square with ``df`` degrees of freedom (bins or categories - 1) scaled by
    1 / n_ref + 1 / n_cur; the chi-square quantile is the Wilson-Hilferty approximation (within 2% for
    df >= 3 and 1% from df 9 at p = 0.999, on the high side). A drift gate that fails only above
    ``max(limit, this)`` does not cry wolf on small runs: with 100 current and 5000 reference images and
    df 9 it is 0.29.

    Args:
        n_ref: rows of the reference sample.
        n_cur: rows of the current sample.
        df: degrees of freedom, at least 1.
        p: the quantile, in (0.5, 1).

    Returns:
        The PSI quantile.
    """
    from statistics import NormalDist

    if n_ref < 1 or n_cur < 1:
        raise ValueError(f"sample sizes must be >= 1, got n_ref={n_ref}, n_cur={n_cur}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if not 0.5 < p < 1:
        raise ValueError(f"p must be within (0.5, 1), got {p}")
    z = NormalDist().inv_cdf(p)
    h = 2.0 / (9.0 * df)
    chi2 = df * (1.0 - h + z * math.sqrt(h)) ** 3
    return chi2 * (1.0 / n_ref + 1.0 / n_cur)


# --- curves for the report: ROC on a fixed FPR grid with a bootstrap band, calibration bins -------------
#: the false-positive rates ROC curves are stored at (``evaluation.roc_fpr``)
ROC_GRID: FloatArray = np.linspace(0.0, 1.0, 51)


def _tpr_on_grid(pos: FloatArray, neg: FloatArray, grid: FloatArray) -> FloatArray:
    """TPR at each false-positive rate of ``grid`` from per-distinct-score counts (ascending scores): the
    highest TPR of a threshold whose FPR does not exceed it (the ROC step function, ties as one step)."""
    tp = np.concatenate([[0.0], np.cumsum(pos[::-1])])
    fp = np.concatenate([[0.0], np.cumsum(neg[::-1])])
    fpr, tpr = fp / fp[-1], tp / tp[-1]
    return tpr[np.searchsorted(fpr, grid + 1e-12, side="right") - 1]


def roc_on_grid(y: ArrayLike, s: ArrayLike, *, grid: ArrayLike = ROC_GRID) -> FloatArray | None:
    """TPR at each false-positive rate of ``grid`` (decision ``s >= threshold``); None when a class is empty.

    At a false-positive rate x the value is the highest TPR of any threshold whose FPR is at most x, so
    tied scores move the curve in one step (no interpolation between thresholds).
    """
    positive, s_arr = _labels_scores(y, s)
    if positive.all() or not positive.any():
        return None
    _, _, pos, neg = _group_counts(positive, s_arr)
    return _tpr_on_grid(pos.astype(float), neg.astype(float), np.asarray(grid, dtype=float))


def bootstrap_roc_band(
    y: ArrayLike, s: ArrayLike, *, grid: ArrayLike = ROC_GRID, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[FloatArray, FloatArray] | None:
    """Pointwise percentile bootstrap band of :func:`roc_on_grid` (resamples with one class skipped).

    Returns:
        (low, high) TPR at each grid point; None when a class is empty, ``n_boot`` is 0, or fewer than
        half the resamples hold both classes.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    positive, s_arr = _labels_scores(y, s)
    n, n_pos = len(positive), int(positive.sum())
    if n_boot <= 0 or n_pos == 0 or n_pos == n:
        return None
    grid_arr = np.asarray(grid, dtype=float)
    curves = [
        _tpr_on_grid(pos, neg, grid_arr)
        for pos, neg in _resampled_counts(positive, s_arr, n_boot=n_boot, seed=seed)
        if pos.sum() and neg.sum()
    ]
    if len(curves) < n_boot / 2:
        return None
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(np.stack(curves), [alpha, 1.0 - alpha], axis=0)
    return low, high


def calibration_bins(
    y: ArrayLike, p: ArrayLike, *, bins: int = 10
) -> tuple[list[float | None], list[float | None], list[int]]:
    """Per equal-width probability bin (the bins of :func:`ece`): mean predicted probability, observed
    positive rate (None for an empty bin) and the number of images."""
    positive, p_arr = _labels_scores(y, p, "p")
    if ((p_arr < 0) | (p_arr > 1)).any():
        raise ValueError("probabilities must lie within [0, 1]")
    edges = np.arange(bins + 1) / bins
    which = np.clip(np.searchsorted(edges, p_arr, side="right") - 1, 0, bins - 1)
    predicted: list[float | None] = []
    observed: list[float | None] = []
    counts: list[int] = []
    for b in range(bins):
        in_bin = which == b
        c = int(in_bin.sum())
        counts.append(c)
        predicted.append(float(p_arr[in_bin].mean()) if c else None)
        observed.append(float(positive[in_bin].mean()) if c else None)
    return predicted, observed, counts
