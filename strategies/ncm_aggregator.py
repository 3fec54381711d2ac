"""Aggregation for the nearest-class-mean recipe: the global state is the running SUM of every released class sum.

Sites release noisy per-class sums of unit feature vectors once per
experience (``client/site_round.py``); the federated class sum is their plain
sum (not an example-weighted mean: a weighted mean would tilt each class
direction towards the sites with more examples elsewhere), accumulated over
experiences, so classes released earlier are kept unchanged. No torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedcl.protocol import CLASS_SUMS, NOISE_VARIANCE
from strategies.aggregation import Arrays, SiteUpdate
from strategies.ncm_sums import ClassSums

SUMS, VARIANCE = CLASS_SUMS, NOISE_VARIANCE  # summed over sites and experiences in the global state
RELEASE = (SUMS, VARIANCE)


class ClassSumAggregator:
    """``new = current + sum of the sites' released sums`` (see the module docstring)."""

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Arrays:
        """Add this round's releases (sums and noise variances) to the running totals."""
        if not updates:
            raise ValueError("no updates to aggregate: pass at least one SiteUpdate")
        for update in updates:
            if set(update.arrays) != set(RELEASE):
                raise ValueError(
                    f"site {update.site!r} sent {sorted(update.arrays)[:3]}; a nearest-class-mean "
                    f"release carries exactly {RELEASE}"
                )
        first = np.asarray(updates[0].arrays[SUMS], dtype=np.float64)
        total = ClassSums(np.array(current[SUMS], dtype=np.float64) if SUMS in current else np.zeros_like(first))
        variance = (
            np.array(current[VARIANCE], dtype=np.float64) if VARIANCE in current else np.zeros(len(first), np.float64)
        )
        for update in updates:
            sums = np.asarray(update.arrays[SUMS], dtype=np.float64)
            rows = np.flatnonzero(np.abs(sums).sum(axis=1) > 0)
            total.add(sums, rows)
            added = np.asarray(update.arrays[VARIANCE], dtype=np.float64).reshape(-1)
            if (
                added.shape != variance.shape
                or np.any(added < 0)
                or np.any(added[np.setdiff1d(range(len(added)), rows)])
            ):
                raise ValueError(
                    f"site {update.site!r}: its noise variances must be one value >= 0 per class, zero outside "
                    "the released rows"
                )
            variance += added
        return {SUMS: total.sums, VARIANCE: variance}
