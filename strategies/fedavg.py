"""FedAvg: every tensor averaged separately, weighted by the sites' example counts.

For LoRA this averages A and B separately, which is not the average of the
sites' updates B_i A_i: mean(B) mean(A) = mean(B A) only when the A_i (or
the B_i) are all equal. The error is the cross terms
sum_ij w_i w_j B_i A_j - sum_i w_i B_i A_i; it grows with how far the sites'
factors drift apart (non-IID data, more local steps, DP noise).
tests/test_strategy_exact.py measures it; see ``exact`` and ``ffa`` for the
alternatives. The combine rule can be swapped for a robust one
(coordinate-wise median, trimmed mean) from :mod:`strategies.combine`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from strategies.aggregation import Arrays, SiteUpdate, common_names
from strategies.combine import Combine, combine_tensors, weighted_mean


class FedAvgAggregator:
    """Each tensor combined separately across sites (example-weighted mean by default)."""

    def __init__(self, combine: Combine = weighted_mean) -> None:
        self.combine = combine

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Arrays:
        """Return every tensor of ``updates`` combined across sites (``current`` is not needed)."""
        return combine_tensors(updates, common_names(updates), self.combine)
