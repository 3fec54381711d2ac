"""The numpy interface every aggregation rule implements (no torch here).

A site's update is the full set of trainable tensors it ends its local
training with (LoRA A and B factors and the classification head), keyed by
parameter name; names containing ``lora_A`` / ``lora_B`` are LoRA factors.
A pair shares the text around the marker, e.g. ``...query.lora_A.default.weight``
(shape (r, in)) and ``...query.lora_B.default.weight`` (shape (out, r)).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Arrays = dict[str, np.ndarray]

LORA_A = "lora_A"
LORA_B = "lora_B"


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
        raise ValueError(
            "cannot weight updates: no update has a positive number of examples; "
            "each reply must report its num-examples (> 0)"
        )
    return counts / counts.sum()


def is_lora_a(name: str) -> bool:
    """Whether ``name`` is a LoRA A factor (shape (r, in))."""
    return LORA_A in name


def is_lora_b(name: str) -> bool:
    """Whether ``name`` is a LoRA B factor (shape (out, r))."""
    return LORA_B in name


def lora_b_name(a_name: str) -> str:
    """The B factor paired with the A factor ``a_name``."""
    prefix, suffix = a_name.split(LORA_A, 1)
    return prefix + LORA_B + suffix


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """The (A name, B name) pairs among ``names``, sorted; every factor must have its partner."""
    names = set(names)
    pairs = sorted((a, lora_b_name(a)) for a in names if is_lora_a(a))
    paired = {n for pair in pairs for n in pair}
    lonely = sorted(n for n in names if (is_lora_a(n) or is_lora_b(n)) and n not in paired)
    lonely += [b for _, b in pairs if b not in names]
    if lonely:
        raise ValueError(f"LoRA factors without their partner: {lonely[:3]}; send every lora_A with its lora_B")
    return pairs


def common_names(updates: Sequence[SiteUpdate]) -> list[str]:
    """The tensor names every update carries (all updates must carry the same ones)."""
    if not updates:
        raise ValueError("no updates to aggregate: pass at least one SiteUpdate")
    names = set(updates[0].arrays)
    for update in updates[1:]:
        if set(update.arrays) != names:
            diff = sorted(names.symmetric_difference(update.arrays))[:3]
            raise ValueError(
                f"site {update.site!r} sent other tensors than {updates[0].site!r} ({diff}); "
                "wrap the aggregator in RobustAggregator to drop malformed replies"
            )
    return sorted(names)


def stacked(updates: Sequence[SiteUpdate], name: str) -> np.ndarray:
    """The tensor ``name`` of every update, stacked along a new first axis."""
    return np.stack([u.arrays[name] for u in updates])


def uploaded_names(aggregator: object, names: Iterable[str]) -> list[str]:
    """The tensor names a site must send back under ``aggregator`` (all unless it says otherwise)."""
    chooser = getattr(aggregator, "uploaded_names", None)
    return sorted(chooser(names)) if chooser is not None else sorted(names)
