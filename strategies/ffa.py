"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at the shared seeded initialisation.

Every site starts from the same seeded A and never trains it, so each site's
update is B_i A with one common A, and the mean of the updates is exactly
mean(B_i) A: averaging B (and the head) is exact aggregation, and A never
has to travel. The client freezes the tensors :func:`ffa_frozen_names` lists
(before it builds its optimiser or privacy engine, so DP noise is not spent
on them) and sends only :func:`ffa_trainable_names`; the server may send back
only those too.

The global A is taken from ``current`` when it holds one, otherwise from the
first update that carries it (a site may send it once, in round 1, so that
the server's checkpoint and export are complete); A sent later is ignored,
and its largest deviation from the global A is kept in ``last_a_deviation``
(non-zero means a site trained A: its client is not freezing it). When no one
ever sends A, the result has no A tensors and every site keeps its seeded one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from strategies.aggregation import Arrays, SiteUpdate, is_lora_a
from strategies.combine import Combine, combine_tensors, weighted_mean


def ffa_frozen_names(names: Iterable[str]) -> list[str]:
    """The tensors FFA-LoRA freezes at their seeded initial value (every ``lora_A``)."""
    return sorted(n for n in names if is_lora_a(n))


def ffa_trainable_names(names: Iterable[str]) -> list[str]:
    """The tensors FFA-LoRA trains and sends both ways (``lora_B`` factors and the head)."""
    return sorted(n for n in names if not is_lora_a(n))


class FFAAggregator:
    """Combines B and the head across sites; passes the frozen A through unchanged."""

    def __init__(self, combine: Combine = weighted_mean) -> None:
        self.combine = combine
        self.last_a_deviation = 0.0

    def uploaded_names(self, names: Iterable[str]) -> list[str]:
        """The tensors a site sends back under FFA: all but the frozen A factors."""
        return ffa_trainable_names(names)

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Arrays:
        """Return B and the head combined across ``updates``, with A from ``current`` or the first sender."""
        if not updates:
            raise ValueError("no updates to aggregate: pass at least one SiteUpdate")
        trainable = ffa_trainable_names(updates[0].arrays)
        for update in updates[1:]:
            if ffa_trainable_names(update.arrays) != trainable:
                raise ValueError(
                    f"site {update.site!r} sent other B/head tensors than {updates[0].site!r}; "
                    "wrap the aggregator in RobustAggregator to drop malformed replies"
                )
        frozen = {n: np.asarray(v) for n, v in current.items() if is_lora_a(n)}
        if not frozen:
            first = next((u for u in updates if ffa_frozen_names(u.arrays)), None)
            frozen = {n: first.arrays[n] for n in ffa_frozen_names(first.arrays)} if first else {}
        self.last_a_deviation = max(
            (float(np.max(np.abs(u.arrays[n] - a))) for u in updates for n, a in frozen.items() if n in u.arrays),
            default=0.0,
        )
        return {**{n: a.copy() for n, a in frozen.items()}, **combine_tensors(updates, trainable, self.combine)}
