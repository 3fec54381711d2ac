"""FedAdam and FedYogi steps against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import SiteUpdate
from strategies.fedavg import FedAvgAggregator
from strategies.server_optimizer import ServerOptimizer


def _round(optimizer: ServerOptimizer, current: dict, targets: list[float]) -> dict:
    """One round where the two sites' mean is ``mean(targets)`` (equal weights)."""
    updates = [SiteUpdate(f"s{i}", {"w": np.array([t], np.float32)}, 1) for i, t in enumerate(targets)]
    return optimizer.aggregate(current, updates)


@pytest.mark.parametrize("method", ["adam", "yogi"])
def test_two_steps_by_hand(method: str) -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    optimizer = ServerOptimizer(FedAvgAggregator(), method=method, lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = 1.0
    first = _round(optimizer, {"w": np.array([x], np.float32)}, [1.5, 2.5])  # mean 2.0: delta 1.0
    # by hand, round 1: m = 0.1 * 1 = 0.1; v0 = tau^2 = 1e-6
    #   adam: v = 0.99e-6 + 0.01 * 1 = 0.01000099;  yogi: v = 1e-6 - 0.01 * 1 * sign(1e-6 - 1) = 0.010001
    v = 0.99e-6 + 0.01 if method == "adam" else 1e-6 + 0.01
    x1 = x + lr * 0.1 / (np.sqrt(v) + tau)
    assert first["w"][0] == pytest.approx(x1, rel=1e-6)
    second = _round(optimizer, {"w": first["w"]}, [x1 - 0.5, x1 - 0.5])  # delta -0.5 (in float32)
    delta = float(np.float32(x1 - 0.5)) - float(first["w"][0])
    m = 0.9 * 0.1 + 0.1 * delta
    v = 0.99 * v + 0.01 * delta**2 if method == "adam" else v - 0.01 * delta**2 * np.sign(v - delta**2)
    assert second["w"][0] == pytest.approx(float(first["w"][0]) + lr * m / (np.sqrt(v) + tau), rel=1e-6)


def test_round_one_without_current_passes_through_and_state_survives() -> None:
    optimizer = ServerOptimizer(FedAvgAggregator(), method="adam")
    first = _round(optimizer, {}, [1.0, 3.0])
    np.testing.assert_allclose(first["w"], [2.0])
    assert optimizer.m == {} and optimizer.v == {}
    _round(optimizer, first, [4.0, 4.0])
    restored = ServerOptimizer(FedAvgAggregator(), method="adam")
    restored.load_state_dict(optimizer.state_dict())
    np.testing.assert_array_equal(restored.m["w"], optimizer.m["w"])
    np.testing.assert_array_equal(restored.v["w"], optimizer.v["w"])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="use one of"):
        ServerOptimizer(FedAvgAggregator(), method="sgd")
    with pytest.raises(ValueError, match="positive"):
        ServerOptimizer(FedAvgAggregator(), lr=0)
    with pytest.raises(ValueError, match="beta"):
        ServerOptimizer(FedAvgAggregator(), beta2=1.0)
