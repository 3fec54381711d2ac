"""Federated nearest-class-mean, server side: add the sites' released class sums, predict by cosine.

Plain numpy (no torch): the sites release noisy per-class sums of unit feature
vectors (``client/nearest_class_mean.py``); the server adds them up, and the
prediction for a feature vector is the class whose summed vector has the
highest cosine with it. The direction of a class sum is the direction of the
class mean, so counts are not needed. Rows that no site has released yet
(classes of future experiences) are excluded from prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


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
