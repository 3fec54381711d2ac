"""FedAvg: every tensor averaged separately, weighted by the sites' example counts.

For LoRA this averages A and B separately, which is not the average of the
sites' updates B_i A_i (mean(B) mean(A) != mean(B A)); see ``exact`` for the
alternative.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from strategies.aggregation import Arrays, SiteUpdate, example_weights


class FedAvgAggregator:
    """Example-weighted mean of each tensor."""

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Arrays:
        """Return the example-weighted mean of every tensor over ``updates``."""
        weights = example_weights(updates)
        names = updates[0].arrays.keys()
        return {
            name: sum(w * u.arrays[name].astype(np.float64) for w, u in zip(weights, updates)).astype(np.float32)
            for name in names
        }
