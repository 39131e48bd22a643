"""Percentile bootstraps, shared by group comparisons, paired evaluations and layer sweeps; Wilson intervals;
rank correlations (numpy only)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from .errors import OptionError
from .options import real_number, whole_number


def bootstrap_indices(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``n_boot`` resamples (with replacement) of ``n`` items, as indices [n_boot, n]."""
    whole_number(n_boot, "n_boot", minimum=1)
    return rng.integers(0, n, size=(n_boot, n))


def wilson_interval(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (NaN, NaN) without trials."""
    if trials == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(1 - (1 - check_confidence(confidence)) / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def check_confidence(confidence: float) -> float:
    """``confidence`` if it lies in (0, 1); an :class:`OptionError` otherwise."""
    if not 0 < real_number(confidence, "confidence") < 1:
        raise OptionError(f"confidence must lie in (0, 1), e.g. 0.95 for a 95% interval; got {confidence!r}.")
    return confidence


def percentile_interval(boot_values: np.ndarray, confidence: float, axis: int = 0,
                        ignore_nan: bool = False) -> np.ndarray:
    """The central ``confidence`` interval of bootstrap values along ``axis``: [2, ...] (low, high);
    ``ignore_nan`` skips NaN values (a value that is NaN in every resample stays NaN)."""
    tail = (1 - check_confidence(confidence)) / 2
    quantile = np.nanquantile if ignore_nan else np.quantile
    return quantile(boot_values, [tail, 1 - tail], axis=axis)


def bootstrap_mean_interval(values: np.ndarray, rng: np.random.Generator, n_boot: int,
                            confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 1-D ``values`` (resampled with replacement)."""
    boot = values[bootstrap_indices(rng, len(values), n_boot)].mean(-1)
    low, high = percentile_interval(boot, confidence)
    return float(low), float(high)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # positions start+1..end, averaged
            start = end
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); NaN under 2 pairs or without spread."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / denominator if denominator > 0 else math.nan


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (ties in either ranking corrected for); NaN under 2 pairs or without spread."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        return math.nan
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    upper = np.triu_indices(len(a), 1)
    concordance = float((da * db)[upper].sum())
    pairs_a, pairs_b = float(np.abs(da[upper]).sum()), float(np.abs(db[upper]).sum())
    return concordance / math.sqrt(pairs_a * pairs_b) if pairs_a > 0 and pairs_b > 0 else math.nan
