"""How one tensor is combined across sites: weighted mean, coordinate-wise median, trimmed mean.

A combine rule takes the sites' copies of one tensor stacked along a new first
axis (n, ...) and the sites' normalised example weights (n,), and returns one
float32 tensor. The mean is weighted by examples; the median and the trimmed
mean are unweighted (as in Flower's FedMedian and FedTrimmedAvg), because a
site could otherwise buy influence by claiming more examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from strategies.aggregation import Arrays, SiteUpdate, example_weights, stacked

Combine = Callable[[np.ndarray, np.ndarray], np.ndarray]


def weighted_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted mean over the first axis, accumulated in float64."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), stack, axes=1).astype(np.float32)


def _columns(stack: np.ndarray) -> np.ndarray:
    # One row per coordinate, one column per site: the partition then runs over
    # contiguous memory, about 4x faster than np.median(axis=0) at 1,000 sites.
    return np.ascontiguousarray(stack.reshape(len(stack), -1).T)


def coordinate_median(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The unweighted coordinate-wise median over the first axis (``weights`` is ignored)."""
    n, half = len(stack), len(stack) // 2
    part = np.partition(_columns(stack), half, axis=1)
    median = part[:, half].astype(np.float64)
    if n % 2 == 0:  # the lower middle value is the largest of the lower half
        median = (median + part[:, :half].max(axis=1)) / 2
    return median.reshape(stack.shape[1:]).astype(np.float32)


def check_trim_fraction(fraction: float) -> None:
    """Raise ValueError unless ``fraction`` is a usable trim fraction, in [0, 0.5)."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trim fraction {fraction} is out of range: use a value in [0, 0.5)")


def trimmed_mean(stack: np.ndarray, weights: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """The unweighted mean after dropping the ``floor(fraction * n)`` lowest and highest values per coordinate."""
    check_trim_fraction(fraction)
    n = len(stack)
    cut = int(fraction * n)
    if cut == 0:
        return stack.mean(axis=0, dtype=np.float64).astype(np.float32)
    part = np.partition(_columns(stack), [cut, n - cut - 1], axis=1)
    middle = part[:, cut : n - cut].mean(axis=1, dtype=np.float64)
    return middle.reshape(stack.shape[1:]).astype(np.float32)


def combine_tensors(updates: Sequence[SiteUpdate], names: Sequence[str], combine: Combine) -> Arrays:
    """Each tensor in ``names`` combined across ``updates`` by ``combine``."""
    weights = example_weights(updates)
    return {name: combine(stacked(updates, name), weights) for name in names}
