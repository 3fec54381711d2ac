"""Federated nearest-class-mean: add the sites' released class sums; predict by cosine, or noise-aware.

Plain numpy (no torch): the sites release noisy per-class sums of unit feature
vectors (``client/nearest_class_mean.py``); the server adds them up. Rows that
no site has released yet (classes of future experiences) are excluded from
prediction.

:func:`predict_nearest_class` is the plain cosine to each summed vector.
:func:`predict_from_release` is what the ``ncm`` recipe uses: each record is
released as ``[a x, b]`` (:func:`with_count_coordinate`; ``a^2 + b^2 = 1``, so
the sensitivity stays 1), which yields a noisy count per class for free, and
the released noise variance per class (public: the sites' noise multipliers)
lets the score undo the bias the noise puts in the cosine. The cosine divides
by ``|s_c + noise|``, about ``sqrt(|s_c|^2 + d v)``: with 384 dimensions the
noise energy is the size of a 30-record class's signal, so the plain cosine
quietly favours classes with more records or tighter features. The score

    kappa * x . s_c / nu_c + log max(n_c, sd_n)
    nu_c = sqrt(max(|s_c|^2 - d v_c, 2 sqrt(2 d) v_c))   (norm with the noise energy taken out, floored)

divides by the corrected norm and adds the class prior explicitly. Measured
on the benchmarks' features (README, "Which head the default recipe
chooses"): +4 to +6 points on CLINC150 at epsilon 8, within MedQuAD's
noise there; kappa from validation curves that were flat over 20 to 80.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

COUNT_WEIGHT = 0.1  # b: the constant coordinate that counts records; 99.5% of the feature's weight stays (a)
FEATURE_WEIGHT = math.sqrt(1.0 - COUNT_WEIGHT**2)  # a: a^2 + b^2 = 1 keeps every released row at norm 1
SCORE_SCALE = 40.0  # kappa: weight of the corrected cosine against the log prior (flat over 20-80 on validation)


@dataclass
class ClassSums:
    """The running federated total of released class sums, and which classes it covers."""

    sums: np.ndarray  # float64 [num_classes, dim]
    released: set[int] = field(default_factory=set)

    @classmethod
    def empty(cls, num_classes: int, dim: int) -> ClassSums:
        """No class released yet."""
        if num_classes < 1 or dim < 1:
            raise ValueError(f"need at least one class and one feature dimension, got {num_classes} x {dim}")
        return cls(np.zeros((num_classes, dim), dtype=np.float64))

    def add(self, site_sums: np.ndarray, classes: Sequence[int]) -> None:
        """Add one site's release; ``classes`` are the rows it released (the other rows must be zero)."""
        site_sums = np.asarray(site_sums, dtype=np.float64)
        if site_sums.shape != self.sums.shape:
            raise ValueError(
                f"released sums have shape {site_sums.shape}, expected {self.sums.shape}; all sites must use "
                "the same model and label set"
            )
        rows = np.asarray(sorted({int(c) for c in classes}), dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.sums)):
            raise ValueError(f"released classes must be 0 .. {len(self.sums) - 1}; got {rows.min()} .. {rows.max()}")
        others = np.setdiff1d(np.arange(len(self.sums)), rows)
        if np.any(site_sums[others] != 0):
            raise ValueError("the release has non-zero rows outside its released classes; list every released class")
        self.sums += site_sums
        self.released.update(int(r) for r in rows)


def predict_nearest_class(
    features: np.ndarray, class_sums: np.ndarray, classes: Sequence[int] | None = None
) -> np.ndarray:
    """For each feature row, the class (among ``classes``, default all) with the highest cosine to its sum."""
    features = np.asarray(features, dtype=np.float64)
    class_sums = np.asarray(class_sums, dtype=np.float64)
    if features.ndim != 2 or class_sums.ndim != 2 or features.shape[1] != class_sums.shape[1]:
        raise ValueError(
            f"features {features.shape} and class sums {class_sums.shape} must be 2-D with the same feature dimension"
        )
    candidates = np.arange(len(class_sums)) if classes is None else np.asarray(sorted(set(classes)), dtype=np.int64)
    if len(candidates) == 0:
        raise ValueError("no candidate classes; release at least one class before predicting")
    directions = class_sums[candidates]
    directions = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    queries = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return candidates[np.argmax(queries @ directions.T, axis=1)]


def with_count_coordinate(features: np.ndarray) -> np.ndarray:
    """Rows ``[a x, b]`` of unit rows ``x``: norm 1, so a sum of them still has sensitivity 1, and counts ride along."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features {features.shape}: give a 2-D array of feature rows")
    norms = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1.0)  # clip to norm 1, as the sums do
    weights = np.full((len(features), 1), COUNT_WEIGHT)
    return np.concatenate([FEATURE_WEIGHT * features / norms, weights], axis=1)


def predict_from_release(
    features: np.ndarray, released: np.ndarray, noise_variance: np.ndarray, classes: Sequence[int] | None = None
) -> np.ndarray:
    """For each unit feature row, the class (among ``classes``) with the best noise-aware score (module docstring).

    ``released``: the summed releases of rows ``[a x, b]`` (shape ``[classes,
    dim + 1]``); ``noise_variance``: per class, the summed per-coordinate noise
    variance of those releases (sum of the sites' sigma^2; 0 without noise).
    """
    features = np.asarray(features, dtype=np.float64)
    released = np.asarray(released, dtype=np.float64)
    variance = np.asarray(noise_variance, dtype=np.float64).reshape(-1)
    if released.ndim != 2 or features.ndim != 2 or features.shape[1] != released.shape[1] - 1:
        raise ValueError(
            f"features {features.shape} and releases {released.shape}: releases carry one count column more"
        )
    if len(variance) != len(released) or np.any(variance < 0):
        raise ValueError(f"noise variance {variance.shape}: give one value >= 0 per class ({len(released)})")
    candidates = np.arange(len(released)) if classes is None else np.asarray(sorted(set(classes)), dtype=np.int64)
    if len(candidates) == 0:
        raise ValueError("no candidate classes; release at least one class before predicting")
    dim = features.shape[1]
    sums = released[candidates, :dim] / FEATURE_WEIGHT
    counts = released[candidates, dim] / COUNT_WEIGHT
    per_coordinate = variance[candidates] / FEATURE_WEIGHT**2
    energy = np.sum(sums**2, axis=1)
    corrected = np.sqrt(np.maximum(energy - dim * per_coordinate, 2 * math.sqrt(2 * dim) * per_coordinate))
    count_floor = np.sqrt(variance[candidates]) / COUNT_WEIGHT  # one noise standard deviation of a count
    prior = np.log(np.maximum(np.maximum(counts, count_floor), 1e-12))
    queries = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    scores = SCORE_SCALE * (queries @ sums.T) / np.maximum(corrected, 1e-12) + prior
    return candidates[np.argmax(scores, axis=1)]
