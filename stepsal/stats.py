"""Percentile bootstraps, shared by group comparisons, paired evaluations and layer sweeps (numpy only)."""

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
