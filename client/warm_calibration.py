"""Recalibrating the noise multiplier when a stream's plan changes, starting from the last calibrated one.

In a stream every new experience changes the plan (another pool size, the
EWC importance batches), so the site recalibrates against its ledger's
history once per experience. The new multiplier is close to the old one, so
instead of a bisection from scratch (8-10 accountant evaluations, each up to
a second with PRV and a long history) this brackets around the stored
multiplier and interpolates ``log(epsilon)`` against ``log(sigma)`` (nearly
linear there): usually 2-4 evaluations. The result has the same guarantee as
``client/noise_plan.calibrate``: the planned epsilon is at most the target
and within ``tolerance`` of it, and it is stored in the same file format, so
``load_or_calibrate`` reuses it while the plan holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from client.noise_plan import NoisePlan, Segment, _priced, _still_holds, load_or_calibrate
from client.privacy_ledger import BudgetError, PrivacyLedger
from fedcl.atomic_files import write_json_atomic

MAX_SIGMA = 1e4
_STEP = 1.25  # bracket growth factor around the previous multiplier


def noise_for_plan(path: Path, ledger: PrivacyLedger, segments: list[Segment], tolerance: float = 0.1) -> NoisePlan:
    """The stored plan if it still holds, else a warm-started calibration (stored), else ``load_or_calibrate``."""
    wanted = [(float(q), int(n)) for q, n in segments]
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        previous = NoisePlan(float(stored["noise_multiplier"]), [tuple(s) for s in stored["segments"]],  # type: ignore[misc]
                             int(stored["history_steps"]), float(stored["planned_epsilon"]))
        if not _still_holds(previous, ledger, wanted):
            write_json_atomic(path, asdict(warm_calibrate(ledger, wanted, previous.noise_multiplier, tolerance)))
    return load_or_calibrate(path, ledger, wanted)


def warm_calibrate(ledger: PrivacyLedger, segments: list[Segment], guess: float, tolerance: float = 0.1) -> NoisePlan:
    """The multiplier with ``target - tolerance <= epsilon(history + segments) <= target``, searched from ``guess``.

    Raises :class:`BudgetError` when no multiplier up to 1e4 fits (the history
    alone has spent the budget).
    """
    if not any(n > 0 for _, n in segments):
        raise ValueError("the plan has no steps; nothing to calibrate")
    if not guess > 0:
        raise ValueError(f"guess {guess!r}: start from a positive noise multiplier")
    target = ledger.target_epsilon

    def price(sigma: float) -> float:
        return _priced(ledger, sigma, segments, ledger.accountant)

    sigma, eps = guess, price(guess)
    if target - tolerance <= eps <= target:
        return NoisePlan(sigma, list(segments), ledger.total_steps, eps)
    factor = _STEP if eps > target else 1 / _STEP
    other, other_eps = sigma, eps
    while (other_eps > target) == (eps > target):  # walk until the target lies between the two
        sigma, eps = other, other_eps
        other = other * factor
        if other > MAX_SIGMA:
            raise BudgetError(
                f"target-epsilon = {target}: the site has spent {ledger.epsilon():.3g} and no noise multiplier fits "
                f"the remaining plan {segments}; raise target-epsilon or plan fewer rounds or steps")
        other_eps = price(other)
    (low, low_eps), (high, high_eps) = sorted([(sigma, eps), (other, other_eps)])  # low sigma: eps above target
    aim = target - tolerance / 2
    for _ in range(30):
        if target - tolerance <= high_eps <= target or high - low < 1e-4:
            break
        t = (math.log(aim) - math.log(low_eps)) / (math.log(high_eps) - math.log(low_eps)) if low_eps > 0 else 0.5
        middle = math.exp(math.log(low) + min(max(t, 0.1), 0.9) * (math.log(high) - math.log(low)))
        middle_eps = price(middle)
        if middle_eps > target:
            low, low_eps = middle, middle_eps
        else:
            high, high_eps = middle, middle_eps
    return NoisePlan(high, list(segments), ledger.total_steps, high_eps)
