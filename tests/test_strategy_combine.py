"""Robust combine rules against numpy's own median and a hand-computed trimmed mean."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import SiteUpdate
from strategies.combine import coordinate_median, trimmed_mean, weighted_mean
from strategies.fedavg import FedAvgAggregator


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_coordinate_median_matches_numpy(n: int) -> None:
    stack = np.random.default_rng(n).standard_normal((n, 3, 4)).astype(np.float32)
    result = coordinate_median(stack, np.full(n, 1 / n))
    np.testing.assert_allclose(result, np.median(stack.astype(np.float64), axis=0), rtol=1e-6)
    assert result.dtype == np.float32 and result.shape == (3, 4)


def test_trimmed_mean_by_hand() -> None:
    column = np.array([100.0, 1.0, 2.0, -50.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], dtype=np.float32)
    stack = np.stack([column, -column], axis=1)  # (10 sites, 2 coordinates)
    result = trimmed_mean(stack, np.full(10, 0.1), fraction=0.2)
    # by hand: cut the 2 lowest (-50, 1) and 2 highest (8, 100): mean(2..7) = 4.5; the negated column gives -4.5
    np.testing.assert_allclose(result, [4.5, -4.5])
    np.testing.assert_allclose(trimmed_mean(stack, np.full(10, 0.1), fraction=0.05), stack.mean(axis=0))
    with pytest.raises(ValueError, match="0.5"):
        trimmed_mean(stack, np.full(10, 0.1), fraction=0.5)


def test_weighted_mean_and_a_median_fedavg() -> None:
    stack = np.array([[1.0], [2.0], [30.0]], dtype=np.float32)
    np.testing.assert_allclose(weighted_mean(stack, np.array([0.5, 0.25, 0.25])), [(0.5 + 0.5 + 7.5)])
    updates = [SiteUpdate(f"s{i}", {"w": v}, 1) for i, v in enumerate(stack)]
    np.testing.assert_allclose(FedAvgAggregator(coordinate_median).aggregate({}, updates)["w"], [2.0])


def test_mismatched_updates_are_refused_with_the_fix() -> None:
    updates = [SiteUpdate("a", {"w": np.zeros(1)}, 1), SiteUpdate("b", {"v": np.zeros(1)}, 1)]
    with pytest.raises(ValueError, match="RobustAggregator"):
        FedAvgAggregator().aggregate({}, updates)
