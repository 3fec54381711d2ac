"""The statistics of a one-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

The game: ``m`` canaries, each included in the training data independently
with probability 1/2; the mechanism runs once; from its output the auditor
guesses "in" for some canaries, "out" for others and abstains on the rest
(``r`` guesses in all), and ``v`` of the guesses are right.

The bound (their Theorem 3.1, with the delta term as in the paper's own
code): if the mechanism is (epsilon, delta)-DP, then for ``W`` the number of
correct guesses and ``Q ~ Binomial(r, q)`` with ``q = e^eps / (1 + e^eps)``
(the accuracy of epsilon-DP randomised response),

    P[W >= v] <= P[Q >= v] + 2 m delta * max_{i = 1..v} P[v - i <= Q < v] / i.

The right-hand side is the p-value of observing ``v`` under the hypothesis
"the mechanism is (epsilon, delta)-DP" (:func:`audit_p_value`). The empirical
lower bound is the largest epsilon that this p-value rejects at level
``beta`` (:func:`epsilon_lower_bound`): with probability at least
``1 - beta`` over the canary coins and the mechanism's noise, the mechanism is
not (epsilon, delta)-DP for any epsilon below it.

What is conservative here, relative to the paper: the search returns an
epsilon whose p-value is below ``beta`` (never past the crossing), and
:func:`audit_scores` tries a few guess counts but tests each at ``beta``
divided by their number (Bonferroni), so choosing the best one after seeing
the scores keeps the stated confidence.

Power, stated plainly: even with every guess right, ``r`` guesses can only
reject epsilon up to about ``log(r / log(1 / beta))`` (all ``r`` right at
``beta = 0.05``: ``q^r = 0.05``, e.g. 3.5 for ``r = 100``). A one-run audit
proves a lower bound; it cannot certify a large epsilon such as 8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

DEFAULT_BETA = 0.05  # 95% confidence, as in the paper
# Shares of the canaries guessed, half "in", half "out". Not 1.0: the coins rarely split exactly in half, so
# guessing m/2 each way errs even on a perfectly separated run; 0.8 leaves room for the split's spread.
DEFAULT_GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.4, 0.8)
EPSILON_CEILING = 100.0  # no count of canaries a CPU affords rejects more than this
SEARCH_TOLERANCE = 1e-6


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} = {value!r}: use a whole number")
    if not 0 <= v <= r <= m:
        raise ValueError(f"m = {m}, r = {r}, v = {v}: need 0 <= correct guesses v <= guesses r <= canaries m")


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0.0 <= delta <= 1.0):
        raise ValueError(f"delta = {delta!r}: use a probability in [0, 1], e.g. 1e-5")


def randomized_response_accuracy(epsilon: float) -> float:
    """``e^eps / (1 + e^eps)``: the best guessing accuracy an epsilon-DP mechanism allows one canary."""
    if not (epsilon >= 0 and not math.isnan(epsilon)):
        raise ValueError(f"epsilon = {epsilon!r}: use a value >= 0")
    return float(1.0 / (1.0 + math.exp(-epsilon))) if math.isfinite(epsilon) else 1.0


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on ``P[at least v of r guesses right]`` for an (epsilon, delta)-DP mechanism with m canaries.

    ``P[Binomial(r, q) >= v] + 2 m delta max_{i=1..v} P[v-i <= Binomial(r, q) < v] / i``
    with ``q = e^eps / (1 + e^eps)``, capped at 1 (Steinke, Nasr, Jagielski
    2023, Theorem 3.1). Raises ValueError unless ``0 <= v <= r <= m``,
    ``epsilon >= 0`` and ``0 <= delta <= 1``.
    """
    _check_counts(m, r, v)
    _check_delta(delta)
    q = randomized_response_accuracy(epsilon)
    if v == 0:
        return 1.0
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Q >= v]
    if delta == 0:
        return min(1.0, tail)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Q = v-1], P[Q = v-2], ..., P[Q = 0]
    worst = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))  # max_i P[v-i <= Q < v] / i
    return min(1.0, tail + 2.0 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = DEFAULT_BETA) -> float:
    """The largest epsilon (to ``1e-6``, never above the crossing) whose p-value for ``v`` of ``r`` is below ``beta``.

    Returns 0.0 when even epsilon = 0 is not rejected (e.g. guesses at chance).
    With probability at least ``1 - beta`` the audited mechanism is not
    (epsilon, delta)-DP for any epsilon below the returned value. Raises
    ValueError for counts or a delta out of range, or ``beta`` outside (0, 1).
    """
    _check_counts(m, r, v)
    _check_delta(delta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta = {beta!r}: use a significance level in (0, 1), e.g. 0.05 for 95% confidence")
    if audit_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0  # invariant: p(low) < beta; grow high until p(high) >= beta
    while audit_p_value(m, r, v, high, delta) < beta:
        low, high = high, 2.0 * high
        if high > EPSILON_CEILING:
            return low
    while high - low > SEARCH_TOLERANCE:
        middle = 0.5 * (low + high)
        if audit_p_value(m, r, v, middle, delta) < beta:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class Guesses:
    """The auditor's guesses: "in" for the ``k_plus`` highest scores, "out" for the ``k_minus`` lowest."""

    k_plus: int
    k_minus: int
    correct: int

    @property
    def guesses(self) -> int:
        """``r``: how many canaries were guessed (the others abstained on)."""
        return self.k_plus + self.k_minus


def guess_membership(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> Guesses:
    """Guess "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest; count the right ones.

    Ties are broken by canary index (never by membership). Raises ValueError
    when ``scores`` and ``included`` differ in length, a score is not finite,
    or ``k_plus + k_minus`` exceeds the number of canaries.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    if len(scores) != len(included):
        raise ValueError(f"{len(scores)} scores for {len(included)} canaries: give one score per canary")
    if not np.all(np.isfinite(scores)):
        raise ValueError("a canary score is not finite; check the mechanism's output (NaN or inf)")
    if min(k_plus, k_minus) < 0 or k_plus + k_minus > len(scores):
        raise ValueError(
            f"k_plus = {k_plus}, k_minus = {k_minus}: use counts >= 0 that add up to at most {len(scores)} canaries"
        )
    order = np.argsort(-scores, kind="stable")  # highest first; equal scores keep index order
    guessed_in = order[:k_plus]
    guessed_out = order[len(order) - k_minus :] if k_minus else order[:0]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return Guesses(int(k_plus), int(k_minus), correct)


@dataclass(frozen=True)
class AuditBound:
    """The result of scoring one run: the best guess set and its empirical epsilon lower bound.

    ``beta`` is the overall significance; each of the ``tests`` guess sets was
    tested at ``beta / tests``.
    """

    canaries: int
    included: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    beta: float
    delta: float
    tests: int


def guess_counts(canaries: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """The ``(k_plus, k_minus)`` pairs tried: for each fraction f, ``round(f m / 2)`` guesses each way (at least 1).

    Duplicates are dropped. Raises ValueError for no canaries or a fraction
    outside (0, 1].
    """
    if canaries < 1:
        raise ValueError(f"canaries = {canaries!r}: audit at least one canary")
    pairs: list[tuple[int, int]] = []
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"guess fraction {fraction!r}: use shares of the canaries in (0, 1], e.g. 0.1,0.4,1")
        half = max(1, int(round(fraction * canaries / 2)))
        k_minus = min(half, canaries // 2)
        pair = (min(half, canaries - k_minus), k_minus)
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    beta: float = DEFAULT_BETA,
    fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> AuditBound:
    """Score one audit run: try each guess count of :func:`guess_counts`, keep the largest Bonferroni-corrected bound.

    ``scores[i]`` is the auditor's evidence that canary ``i`` was included
    (higher: more likely in); ``included[i]`` its true coin. Each guess set is
    tested at ``beta / (number of guess sets)``, so the returned bound holds
    with confidence ``1 - beta`` although the best set was chosen afterwards.
    """
    included = np.asarray(included, dtype=bool).reshape(-1)
    pairs = guess_counts(len(included), fractions)
    level = beta / len(pairs)
    results = []
    for k_plus, k_minus in pairs:
        guess = guess_membership(scores, included, k_plus, k_minus)
        bound = epsilon_lower_bound(len(included), guess.guesses, guess.correct, delta, level)
        results.append(
            AuditBound(
                len(included),
                int(included.sum()),
                k_plus,
                k_minus,
                guess.guesses,
                guess.correct,
                bound,
                beta,
                delta,
                len(pairs),
            )
        )
    return max(results, key=lambda result: result.epsilon_lower_bound)  # the first of equals: fewest guesses
