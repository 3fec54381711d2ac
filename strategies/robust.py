"""A validating, optionally clipping wrapper around any aggregator.

Every reply is checked before aggregation; a bad one is dropped with its
reason and the round goes on with the rest. In order:

1. sender: a known site (when ``known_sites`` is given), at most one reply per
   site per round, a positive example count (at most ``max_examples``);
2. tensors: the names the inner aggregator needs are all there, no name
   outside the expected spec, shapes and dtypes as expected, finite values.
   The spec is ``spec`` when given, else the current global arrays, else (round
   1, when the server holds nothing yet) the spec most replies share;
3. update norm: ||x_i - reference|| over the uploaded tensors must be at most
   ``max_update_norm`` (absolute) and at most ``max_norm_ratio`` times the
   lower median of the valid replies' norms (relative; needs >= 3 valid
   replies). The reference is the current global arrays; in round 1, when
   ``current`` is empty, it is the coordinate-wise median of the valid
   replies when there are at least 3 of them, and otherwise there is no
   reference and no norm check (with 2 replies neither can be told from the
   other without one).

Then, with ``clip_norm``, every accepted update's difference from the
reference is scaled down to at most that norm (no clipping without a
reference). The inner aggregator sees only the accepted (clipped) replies;
if none is left, the current global arrays are returned unchanged.

After each round ``last_rejections`` lists (site, reason) for the server's
metrics.jsonl, ``last_update_norms`` the norms of the replies that reached the
norm check, and ``last_clipped`` the sites whose update was clipped.
Coordinate-wise median and trimmed mean are combine rules of the inner
aggregator (:mod:`strategies.combine`); :func:`strategies.registry.build_aggregator`
puts the two together.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from strategies.aggregation import Aggregator, Arrays, SiteUpdate, uploaded_names
from strategies.combine import coordinate_median
from strategies.validation import Spec, consensus_spec, sender_problem, spec_of, tensor_problem, update_norm

logger = logging.getLogger(__name__)


class Rejection(NamedTuple):
    """A reply dropped before aggregation, and why."""

    site: str
    reason: str


def _lower_median(values: Sequence[float]) -> float:
    return sorted(values)[(len(values) - 1) // 2]


def _median_reference(updates: Sequence[SiteUpdate], names: Sequence[str]) -> Arrays:
    weights = np.ones(len(updates))
    return {n: coordinate_median(np.stack([u.arrays[n] for u in updates]), weights) for n in names}


def _clipped(
    update: SiteUpdate, reference: Mapping[str, np.ndarray], names: Sequence[str], factor: float
) -> SiteUpdate:
    arrays = dict(update.arrays)
    for name in names:
        arrays[name] = (reference[name] + factor * (arrays[name] - reference[name])).astype(arrays[name].dtype)
    return SiteUpdate(update.site, arrays, update.num_examples)


class RobustAggregator:
    """Validates every reply, drops the bad ones with a reason, optionally clips, then aggregates the rest."""

    def __init__(
        self,
        inner: Aggregator,
        *,
        known_sites: Collection[str] | None = None,
        spec: Spec | None = None,
        max_update_norm: float | None = None,
        max_norm_ratio: float | None = 10.0,
        clip_norm: float | None = None,
        max_examples: int | None = None,
    ) -> None:
        for label, value in (
            ("max_update_norm", max_update_norm),
            ("max_norm_ratio", max_norm_ratio),
            ("clip_norm", clip_norm),
            ("max_examples", max_examples),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{label} must be positive, got {value}: use a positive bound or None for no bound")
        self.inner = inner
        self.known_sites = frozenset(known_sites) if known_sites is not None else None
        self.spec = spec
        self.max_update_norm, self.max_norm_ratio = max_update_norm, max_norm_ratio
        self.clip_norm, self.max_examples = clip_norm, max_examples
        self.last_rejections: list[Rejection] = []
        self.last_update_norms: dict[str, float] = {}
        self.last_clipped: list[str] = []

    def uploaded_names(self, names: Iterable[str]) -> list[str]:
        """The tensors a site sends back: whatever the inner aggregator needs."""
        return uploaded_names(self.inner, names)

    def _reject(self, update: SiteUpdate, reason: str) -> None:
        self.last_rejections.append(Rejection(update.site, reason))
        logger.warning("rejected the reply of %s: %s", update.site, reason)

    def _valid_structure(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> list[SiteUpdate]:
        spec = self.spec or (spec_of(current) if current else consensus_spec(updates))
        required = set(uploaded_names(self.inner, spec))
        valid, seen = [], set()
        for update in updates:
            reason = sender_problem(update, self.known_sites, self.max_examples)
            if reason is None and update.site in seen:
                reason = "a second reply from the same site in one round"
            seen.add(update.site)
            reason = reason or tensor_problem(update.arrays, spec, required)
            if reason:
                self._reject(update, reason)
            else:
                valid.append(update)
        return valid

    def _within_bounds(
        self, valid: list[SiteUpdate], reference: Mapping[str, np.ndarray], names: list[str]
    ) -> list[SiteUpdate]:
        norms = {u.site: update_norm(u.arrays, reference, names) for u in valid}
        self.last_update_norms = norms
        typical = _lower_median(list(norms.values())) if len(norms) >= 3 else 0.0
        accepted = []
        for update in valid:
            norm = norms[update.site]
            if self.max_update_norm is not None and not norm <= self.max_update_norm:
                self._reject(update, f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:.4g}")
            elif self.max_norm_ratio is not None and typical > 0 and not norm <= self.max_norm_ratio * typical:
                self._reject(
                    update, f"update norm {norm:.4g} exceeds {self.max_norm_ratio:g} x the median norm {typical:.4g}"
                )
            elif self.clip_norm is not None and norm > self.clip_norm:
                self.last_clipped.append(update.site)
                accepted.append(_clipped(update, reference, names, self.clip_norm / norm))
            else:
                accepted.append(update)
        return accepted

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Arrays:
        """Aggregate the replies that pass every check; the rejected ones are in ``last_rejections``."""
        self.last_rejections, self.last_update_norms, self.last_clipped = [], {}, []
        valid = self._valid_structure(current, updates)
        names = uploaded_names(self.inner, valid[0].arrays) if valid else []
        if valid and all(n in current for n in names):
            valid = self._within_bounds(valid, current, names)
        elif len(valid) >= 3:
            valid = self._within_bounds(valid, _median_reference(valid, names), names)
        if not valid:
            logger.warning("no reply passed validation: the global arrays stay as they were")
            return {name: np.array(value, copy=True) for name, value in current.items()}
        return self.inner.aggregate(current, valid)

    def state_dict(self) -> Arrays:
        """The inner aggregator's state (this wrapper keeps none across rounds)."""
        return getattr(self.inner, "state_dict", dict)()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the inner aggregator's state."""
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state)
