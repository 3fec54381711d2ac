"""The site's budget for one round: open the ledger under a lock, choose the noise, price, record, save.

:func:`open_budget` is the only way a round touches the ledger:

1. takes an exclusive, non-blocking lock on the state directory (a second
   training on the same state directory is refused at once, never queued:
   two overlapping load-train-save cycles would lose a spend);
2. checks the sentinel: a site that has ever recorded a mechanism has a
   sentinel holding its step count, the Renyi divergence its history costs
   at the filter order (all entries in sequence) and the divergence of each
   record group; a missing ledger beside a sentinel (or beside
   any other training state) is a lost ledger, and a ledger with fewer steps
   or a smaller divergence than the sentinel is a rolled-back or replaced
   one (so is a ledger in which any record group got cheaper): all refuse to
   train, with or without a fixed noise multiplier;
3. :meth:`SiteBudget.noise_multiplier` is the one place sigma is chosen: the
   committed sigma while the site's remaining plan still fits under it, else
   the smallest sigma that fits (a bisection against the RDP filter); under
   secure aggregation :meth:`SiteBudget.common_noise_multiplier` adopts the
   round's common level instead, if the filter affords the plan at it (the
   hint ``noise.json`` is neither read nor written);
4. :meth:`SiteBudget.can_afford` prices the exact mechanism objects the phase
   will run, and :meth:`SiteBudget.record` records them, saves the ledger
   atomically and then the sentinel, before any output leaves.

A round without DP takes the same lock (the buffer and EWC state are still
written) and has no ledger.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from client.mechanisms import RecordGroups, SgdMechanism
from client.privacy_ledger import BudgetError, Entry, LedgerError, PrivacyLedger, best_order
from client.site_policy import SitePolicy
from client.site_state import SiteState
from fedcl.atomic_files import write_json_atomic

MAX_SIGMA = 1e4  # past this no noise level trains anything: the plan does not fit
# (sample_rate, steps, record groups read) at the noise being chosen; client/site_round.py plans in these
Segment = tuple[float, int, RecordGroups | None]


class SiteBusyError(ValueError):
    """Another training holds this site's state directory."""


@dataclass
class SiteBudget:
    """An open ledger (None without DP) under the site's lock."""

    state: SiteState
    policy: SitePolicy
    ledger: PrivacyLedger | None

    def noise_multiplier(self, plan: Sequence[Segment], fixed: Sequence[Entry] = (), proposed: float = 0.0) -> float:
        """The noise multiplier for the site's remaining plan: ``plan`` at that sigma plus ``fixed`` entries.

        Each segment and entry names the record groups it reads, so the plan
        is priced per record (parallel composition over disjoint groups,
        ``client/privacy_ledger.py``).

        ``proposed > 0`` (run config ``noise-multiplier``) is taken as it is;
        the filter still stops the site at its target. Otherwise the sigma
        committed by an earlier round is kept while history + fixed + plan
        still fits under it; else the smallest sigma that fits is searched
        and committed. On first use the filter order is fixed to the best
        order for that plan. Raises :class:`BudgetError` when no sigma up to
        1e4 fits (the budget is spent).
        """
        ledger = self._ledger()
        fixed = list(fixed)
        segments = [(float(q), int(n), groups) for q, n, groups in plan if n > 0]
        if not segments:
            raise ValueError("the site's remaining plan has no steps; give the run at least one round with steps")

        def entries(sigma: float) -> list[Entry]:
            return [*fixed, *((sigma, q, n, groups) for q, n, groups in segments)]

        if proposed > 0:
            sigma = float(proposed)
        else:
            committed = self._committed_sigma()
            if committed and ledger.filter_order is not None and ledger.can_afford(entries(committed)):
                return committed
            sigma = _smallest_fitting(ledger, entries)
        ledger.commit_order(best_order([*ledger.entries(), *entries(sigma)], ledger.delta))
        if proposed <= 0:
            write_json_atomic(self.state.noise_hint, {"noise_multiplier": sigma})
        return sigma

    def common_noise_multiplier(self, plan: Sequence[Segment], fixed: Sequence[Entry], sigma: float) -> float:
        """Adopt the secure round's common noise level ``sigma`` if this site can afford its remaining plan at it.

        ``sigma``: :func:`fresh_noise_multiplier` of the run's policy and plan
        (every honest site adds the same share). Prices history + ``fixed`` +
        ``plan`` at ``sigma`` with the ledger's own filter check, fixes the
        filter order on first use, and returns ``sigma``. Never reads or
        writes the noise hint (``noise.json``): a round at the common level
        leaves the site's own calibration as it was. Raises
        :class:`BudgetError` (a fixed reason: the inputs are the public plan
        and the ledger's public mechanisms) when the plan does not fit.
        """
        ledger = self._ledger()
        segments = [(float(q), int(n), groups) for q, n, groups in plan if n > 0]
        if not segments:
            raise ValueError("the site's remaining plan has no steps; give the run at least one round with steps")
        entries = [*fixed, *((float(sigma), q, n, groups) for q, n, groups in segments)]
        if not ledger.can_afford(entries):
            raise BudgetError(
                f"target-epsilon = {ledger.target_epsilon}: the site has spent {ledger.epsilon():.3g} and its remaining "
                f"plan does not fit at the secure round's common noise multiplier {float(sigma):.4g}; it takes no "
                "part (raise target-epsilon in the site's policy for a new site, or plan fewer rounds or steps)"
            )
        ledger.commit_order(best_order([*ledger.entries(), *entries], ledger.delta))
        return float(sigma)

    def can_afford(self, mechanisms: Sequence[SgdMechanism]) -> bool:
        """True if the filter lets these exact mechanisms run (always True without DP).

        Raises ValueError under DP before the filter order is fixed
        (:meth:`noise_multiplier` fixes it): the filter needs its order first.
        """
        if self.ledger is None:
            return True
        if self.ledger.filter_order is None:
            raise ValueError("the filter order is not fixed yet; choose the noise (noise_multiplier) before pricing")
        return self.ledger.can_afford([m.priced_entry for m in mechanisms])

    def epsilon_if(self, mechanisms: Sequence[SgdMechanism]) -> float:
        """Epsilon after these mechanisms (0 without DP)."""
        return 0.0 if self.ledger is None else self.ledger.epsilon_if([m.priced_entry for m in mechanisms])

    def record(self, mechanism: SgdMechanism) -> None:
        """Record a mechanism that ran, save the ledger atomically, then the sentinel; nothing without DP."""
        if self.ledger is None:
            return
        if not mechanism.private:
            raise ValueError("a site under DP ran a mechanism without noise; every release must be a priced mechanism")
        if not self.ledger.can_afford([mechanism.priced_entry]):  # the caller checked; never record past the target
            raise BudgetError("the mechanism was not priced before it ran; this is a bug in the site round")
        self.ledger.record(*mechanism.priced_entry)
        self.ledger.save(self.state.ledger)
        order = self.ledger.filter_order
        write_json_atomic(
            self.state.sentinel,
            {
                "format": "fedcl-sentinel",
                "dp_steps_total": self.ledger.total_steps,
                "filter_order": order,
                "rdp_at_order": self.ledger.divergence(order) if order else None,
                "rdp_by_group": self.ledger.group_divergences(order) if order else None,
            },
        )

    def facts(self) -> dict[str, float]:
        """The ledger's figures for the reply (all functions of the public mechanisms recorded)."""
        if self.ledger is None:
            return {}
        return {
            "epsilon": self.ledger.epsilon(),
            "dp-steps-total": self.ledger.total_steps,
            "target-epsilon": self.ledger.target_epsilon,
            "delta": self.ledger.delta,
        }

    def _ledger(self) -> PrivacyLedger:
        if self.ledger is None:
            raise ValueError("this site runs without DP (its policy says dp = false): there is no noise to choose")
        return self.ledger

    def _committed_sigma(self) -> float:
        path = self.state.noise_hint
        if not path.exists():
            return 0.0
        try:
            return float(json.loads(path.read_text(encoding="utf-8"))["noise_multiplier"])
        except (ValueError, KeyError, TypeError):
            return 0.0  # a damaged hint only costs a new calibration; the ledger is what guards the budget


def fresh_noise_multiplier(
    policy: SitePolicy, plan: Sequence[Segment], fixed: Sequence[Entry] = (), proposed: float = 0.0
) -> float:
    """The noise multiplier a site of ``policy`` with an empty ledger would choose for ``plan`` (nothing is saved).

    The common noise level of a secure round: every honest site with the
    run's policy and plan and a fresh ledger chooses exactly this value
    (``proposed > 0``: that value). Under secure aggregation every site takes
    it and joins only if its own ledger affords the plan at it
    (:meth:`SiteBudget.common_noise_multiplier`, ``client/site_round.py``).
    """
    if proposed > 0:
        return float(proposed)
    ledger = PrivacyLedger(target_epsilon=policy.target_epsilon, delta=policy.delta)
    segments = [(float(q), int(n), groups) for q, n, groups in plan if n > 0]
    return _smallest_fitting(ledger, lambda sigma: [*fixed, *((sigma, q, n, g) for q, n, g in segments)])


def _smallest_fitting(ledger: PrivacyLedger, entries: Callable[[float], list[Entry]]) -> float:
    """Bisection (in log sigma) for the smallest sigma whose entries the filter lets through."""

    def fits(sigma: float) -> bool:  # before the order is committed, the ledger prices at the best order
        return ledger.can_afford(entries(sigma))

    high = 1.0
    while not fits(high):
        high *= 2
        if high > MAX_SIGMA:
            raise BudgetError(
                f"target-epsilon = {ledger.target_epsilon}: the site has spent {ledger.epsilon():.3g} and no noise "
                "multiplier fits what it still plans; raise target-epsilon in the site's policy (a new site) or plan "
                "fewer rounds or steps"
            )
    low = high / 2
    while fits(low) and low > 1e-3:
        high, low = low, low / 2
    while high / low > 1.002:
        middle = math.sqrt(low * high)
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


@contextlib.contextmanager
def open_budget(state: SiteState, policy: SitePolicy) -> Iterator[SiteBudget]:
    """The site's budget for one round, under its exclusive lock (see the module docstring).

    Raises :class:`SiteBusyError` when another training holds the lock and
    :class:`LedgerError` for a lost, rolled-back or damaged ledger.
    """
    with _exclusive_lock(state):
        if not policy.dp and (state.ledger.exists() or state.sentinel.exists()):
            raise LedgerError(
                f"{state.folder} holds a privacy ledger: this site has trained under DP, and a round without DP would "
                "release outside it while its ledger still shows a finite epsilon; keep dp = true for this site, or "
                "give a non-private baseline its own state-dir"
            )
        ledger = _open_ledger(state, policy) if policy.dp else None
        yield SiteBudget(state, policy, ledger)


@contextlib.contextmanager
def _exclusive_lock(state: SiteState) -> Iterator[None]:
    handle = state.lock.open("a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise SiteBusyError(
                "this site's state directory is in use by another training; one training at a time per state "
                "directory: wait for it to finish, or give each site its own state-dir"
            ) from err
        yield
    finally:
        handle.close()  # closing releases the flock


def _open_ledger(state: SiteState, policy: SitePolicy) -> PrivacyLedger:
    """Load the ledger, or create it for a site that never trained; refuse a lost or rolled-back one."""
    restore = (
        "restore the whole state directory from the backup taken after its last round (a site must never restart "
        "its budget)"
    )
    sentinel = _sentinel(state)
    sentinel_steps = None if sentinel is None else int(sentinel["dp_steps_total"])
    if not state.ledger.exists():
        others = state.training_files()
        if sentinel_steps is not None or others:
            found = state.sentinel.name if sentinel_steps is not None else others[0].name
            raise LedgerError(
                f"privacy ledger {state.ledger} is missing but {found} shows the site has trained; {restore}"
            )
        ledger = PrivacyLedger(target_epsilon=policy.target_epsilon, delta=policy.delta)
        ledger.save(state.ledger)
        return ledger
    ledger = PrivacyLedger.load(state.ledger, target_epsilon=policy.target_epsilon, delta=policy.delta)
    if sentinel_steps is not None and ledger.total_steps < sentinel_steps:
        raise LedgerError(
            f"privacy ledger {state.ledger} holds {ledger.total_steps} steps but the sentinel recorded "
            f"{sentinel_steps}: the ledger was rolled back; {restore}"
        )
    if sentinel is not None and sentinel.get("rdp_at_order") is not None:
        order = float(sentinel["filter_order"])
        if ledger.filter_order != order or ledger.divergence(order) < float(sentinel["rdp_at_order"]) * (1 - 1e-9):
            raise LedgerError(
                f"privacy ledger {state.ledger} prices less than the sentinel recorded (another filter order, or "
                f"cheaper entries than were spent): it was replaced or rolled back; {restore}"
            )
        now = ledger.group_divergences(order)
        lowered = [
            key for key, spent in (sentinel.get("rdp_by_group") or {}).items() if now.get(key, 0.0) < spent * (1 - 1e-9)
        ]
        if lowered:
            raise LedgerError(
                f"privacy ledger {state.ledger} prices the record group {lowered[0]} lower than the sentinel recorded "
                f"(entries moved to other groups or removed): it was replaced or rolled back; {restore}"
            )
    return ledger


def _sentinel(state: SiteState) -> dict | None:
    """The sentinel's record (step count, filter order, Renyi divergence at it), or None for a site that never ran."""
    if not state.sentinel.exists():
        return None
    try:
        document = json.loads(state.sentinel.read_text(encoding="utf-8"))
        int(document["dp_steps_total"])
        return document
    except (ValueError, KeyError, TypeError) as err:
        raise LedgerError(f"{state.sentinel} is damaged ({err}); restore the state directory from its backup") from err


__all__ = ["Segment", "SiteBudget", "SiteBusyError", "open_budget"]
