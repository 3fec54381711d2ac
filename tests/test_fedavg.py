"""FedAvg against a hand computation."""

import numpy as np
import pytest

from strategies.aggregation import SiteUpdate
from strategies.fedavg import FedAvgAggregator


def test_fedavg_weights_by_examples():
    updates = [
        SiteUpdate("a", {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.0], np.float32)}, 1),
        SiteUpdate("b", {"w": np.array([4.0, 8.0], np.float32), "b": np.array([3.0], np.float32)}, 3),
    ]
    result = FedAvgAggregator().aggregate({}, updates)
    # by hand: (1*[1,2] + 3*[4,8]) / 4 = [13/4, 26/4]; (1*0 + 3*3)/4 = 9/4
    np.testing.assert_allclose(result["w"], [3.25, 6.5])
    np.testing.assert_allclose(result["b"], [2.25])
    assert result["w"].dtype == np.float32


def test_fedavg_refuses_updates_without_examples():
    with pytest.raises(ValueError, match="positive number of examples"):
        FedAvgAggregator().aggregate({}, [SiteUpdate("a", {"w": np.zeros(1)}, 0)])
