"""The mechanisms a site runs on its private data, as exact settings: what is priced is what runs.

A site round turns the round's instructions into a list of these objects
(``client/site_round.py``); the site budget prices exactly these objects
(``client/site_budget.py``) and the phases run exactly these objects
(``client/dp_training.py``, ``client/ewc.py``, ``client/nearest_class_mean.py``).
Nothing recomputes a sample rate or a step count on the way.

Every field is public: it is a function of the site's policy, its public
nominal size and the public run plan, never of its records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

UNBOUNDED_CLIP = 1e9  # a non-private run: the same code path with no clipping and no noise

Step = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps): one entry of an Opacus accountant's history


@dataclass(frozen=True)
class RecordGroups:
    """Which disjoint groups of the site's records a mechanism reads: cells of one public partition.

    ``partition`` names the record attribute the cells are values of
    (``"label"`` or ``"group"``: the experience plan's unit), ``cells`` the
    values read. A record belongs to exactly one cell of a partition, decided
    by its own content (its label, or its group value), so a mechanism that
    does not read a record's cell computes the same output with or without
    that record: the privacy ledger composes a record's mechanisms only
    (``client/privacy_ledger.py``). The partition and cells come from the
    public run config (labels, groups, the experience plan), never from the
    site's records.
    """

    partition: str
    cells: frozenset[str]

    def __post_init__(self) -> None:
        if not self.partition:
            raise ValueError("a record partition needs a name, e.g. 'label' or 'group'")
        if not self.cells or any(not isinstance(c, str) or not c for c in self.cells):
            raise ValueError(f"cells {sorted(self.cells)!r}: name at least one cell, each a non-empty string")

    @classmethod
    def of(cls, partition: str, cells: Iterable[str]) -> RecordGroups:
        """The groups ``cells`` (any iterable of names) of ``partition``."""
        return cls(str(partition), frozenset(str(c) for c in cells))

    def to_json(self) -> list:
        """``[partition, [cells sorted]]``, as the ledger file stores it."""
        return [self.partition, sorted(self.cells)]


@dataclass(frozen=True)
class SgdMechanism:
    """``steps`` steps of the subsampled Gaussian mechanism, as DP-SGD (or a private importance estimate) runs them.

    Each step draws a Poisson batch (every record independently with
    probability ``sample_rate``), clips each example's gradient to
    ``max_grad_norm``, adds Gaussian noise of std ``noise_multiplier *
    max_grad_norm`` to the sum and divides by ``expected_batch_size`` (a public
    constant: ``sample_rate`` times the site's nominal record count). The
    number of records actually present does not enter the price: under
    add/remove adjacency the privacy of Poisson sampling at a fixed rate does
    not depend on it, and a pool with no record runs noise-only steps.
    ``noise_multiplier = 0`` with ``max_grad_norm = UNBOUNDED_CLIP`` is plain
    (non-private) training through the same code.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    expected_batch_size: float
    reads: RecordGroups | None = None  # the record groups it reads; None: every record of the site

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise multiplier {self.noise_multiplier!r}: use a finite value >= 0")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample rate {self.sample_rate!r}: use expected batch / nominal records, in (0, 1]")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps {self.steps!r}: use a whole number >= 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm {self.max_grad_norm!r}: use a positive clipping bound, e.g. 1.0")
        if not (math.isfinite(self.expected_batch_size) and self.expected_batch_size > 0):
            raise ValueError(
                f"expected_batch_size {self.expected_batch_size!r}: use sample rate x nominal records, > 0"
            )

    @property
    def private(self) -> bool:
        """True when the steps add noise (the ledger must record them)."""
        return self.noise_multiplier > 0

    @property
    def ledger_entry(self) -> Step:
        """What the privacy ledger records for this mechanism."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))

    @property
    def priced_entry(self) -> tuple[float, float, int, RecordGroups | None]:
        """What the privacy filter prices: the ledger entry and the record groups it reads."""
        return (*self.ledger_entry, self.reads)


def sgd_mechanism(
    noise_multiplier: float,
    expected_batch: int,
    nominal_records: float,
    steps: int,
    max_grad_norm: float,
    reads: RecordGroups | None = None,
) -> SgdMechanism:
    """The mechanism of ``steps`` Poisson batches of expected size ``expected_batch`` over ``nominal_records``.

    The sample rate is ``min(1, expected_batch / nominal_records)`` and the
    divisor ``sample_rate * nominal_records``; both depend only on public
    values. ``reads``: the record groups of the pool (None: every record).
    Raises ValueError for a non-positive nominal size.
    """
    if not nominal_records > 0:
        raise ValueError(f"nominal records {nominal_records!r}: use the site's public record count, > 0")
    rate = min(1.0, expected_batch / nominal_records)
    return SgdMechanism(float(noise_multiplier), rate, int(steps), float(max_grad_norm), rate * nominal_records, reads)
