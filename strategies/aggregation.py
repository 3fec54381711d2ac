"""The numpy interface every aggregation rule implements (no torch here).

A site's update is the full set of trainable tensors it ends its local
training with (LoRA A and B factors and the classification head), keyed by
parameter name; names containing ``lora_A`` / ``lora_B`` are LoRA factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class SiteUpdate:
    """One site's reply to a training round."""

    site: str
    arrays: Arrays
    num_examples: int


class Aggregator(Protocol):
    """Turns the current global arrays and the sites' updates into new global arrays."""

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Arrays:
        """Return the new global arrays (same keys and shapes as the updates)."""
        ...


def example_weights(updates: Sequence[SiteUpdate]) -> np.ndarray:
    """Normalised weights proportional to each update's number of examples."""
    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    if len(counts) == 0 or counts.sum() <= 0:
        raise ValueError("cannot weight updates: no update has a positive number of examples")
    return counts / counts.sum()
