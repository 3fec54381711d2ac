"""Calibrate a site's noise multiplier once for everything it still plans to do, and keep it.

A plan is a list of segments ``(sample_rate, steps)`` (e.g. the probe phase at
one batch size, then the LoRA phase at another). The noise multiplier is the
smallest one with which the recorded history plus the whole remaining plan
stays within the site's target epsilon. It is calibrated at the site's first
training round, written to the state directory, and reused while the plan it
was made for still holds; a changed plan (for example a new experience with a
different number of records) is calibrated again against the ledger's history,
so the total never exceeds the budget.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from client.privacy_ledger import BudgetError, PrivacyLedger, Step, compute_epsilon
from fedcl.atomic_files import write_json_atomic

Segment = tuple[float, int]  # (sample_rate, steps)


@dataclass(frozen=True)
class NoisePlan:
    """A calibrated noise multiplier and the plan it was calibrated for."""

    noise_multiplier: float
    segments: list[Segment]
    history_steps: int  # ledger steps at calibration time
    planned_epsilon: float


def _priced(ledger: PrivacyLedger, sigma: float, segments: list[Segment], accountant: str) -> float:
    extra: list[Step] = [(sigma, q, n) for q, n in segments if n > 0]
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha": only a looser bound, still valid
        warnings.simplefilter("ignore", UserWarning)
        return compute_epsilon([*ledger.history, *extra], ledger.delta, accountant)


def calibrate(ledger: PrivacyLedger, segments: list[Segment], tolerance: float = 0.1) -> NoisePlan:
    """The smallest noise multiplier that keeps history + ``segments`` within the target epsilon.

    Brackets with the fast RDP accountant (an upper bound of PRV's epsilon, so
    its answer always fits), then refines with the ledger's own accountant
    until the planned epsilon is within ``tolerance`` below the target.
    """
    target = ledger.target_epsilon
    if not any(n > 0 for _, n in segments):
        raise ValueError("the plan has no steps; nothing to calibrate")
    low, high = 0.0, 1.0
    while _priced(ledger, high, segments, "rdp") > target:
        low, high = high, high * 2
        if high > 1e4:
            raise BudgetError(
                f"target-epsilon = {target}: the site has spent {ledger.epsilon():.3g} and no noise multiplier fits "
                f"the remaining plan {segments}; raise target-epsilon or plan fewer rounds or steps"
            )
    spent = _priced(ledger, high, segments, ledger.accountant)
    while spent > target:  # the RDP bracket is an upper bound in practice; never rely on it blindly
        low, high = high, high * 2
        spent = _priced(ledger, high, segments, ledger.accountant)
    while high - low > 1e-3:
        middle = (low + high) / 2
        eps_middle = _priced(ledger, middle, segments, ledger.accountant) if middle > 0 else float("inf")
        if eps_middle <= target:
            high, spent = middle, eps_middle
            if target - spent <= tolerance:
                break
        else:
            low = middle
    return NoisePlan(high, [(float(q), int(n)) for q, n in segments], ledger.total_steps, spent)


def load_or_calibrate(path: Path, ledger: PrivacyLedger, segments: list[Segment]) -> NoisePlan:
    """The stored plan if it was made for this ledger position and these segments, else a new calibration."""
    wanted = [(float(q), int(n)) for q, n in segments]
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        plan = NoisePlan(float(stored["noise_multiplier"]), [tuple(s) for s in stored["segments"]],  # type: ignore[misc]
                         int(stored["history_steps"]), float(stored["planned_epsilon"]))
        if _still_holds(plan, ledger, wanted):
            return plan
    plan = calibrate(ledger, wanted)
    write_json_atomic(path, asdict(plan))
    return plan


def _still_holds(plan: NoisePlan, ledger: PrivacyLedger, remaining: list[Segment]) -> bool:
    """True if ``remaining`` is what is left of ``plan`` after the steps taken since it was made."""
    taken = ledger.total_steps - plan.history_steps
    left = []
    for q, n in plan.segments:
        used = min(taken, n)
        taken -= used
        if n - used > 0:
            left.append((q, n - used))
    merged_remaining = [(q, n) for q, n in remaining if n > 0]
    return taken == 0 and len(left) == len(merged_remaining) and all(
        abs(a[0] - b[0]) < 1e-12 and a[1] == b[1] for a, b in zip(left, merged_remaining))
