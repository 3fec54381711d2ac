"""One-off Gaussian-mechanism releases: what the ledger records, and the noise for an (epsilon, delta) target.

DP-SGD is not the only private release a site makes: EWC importances and the
nearest-class-mean class sums are Gaussian mechanisms too. Each one is, for
the accountant, ``steps`` steps of the (subsampled) Gaussian mechanism with a
noise multiplier (noise std / L2 sensitivity) and a sample rate, exactly the
``(noise_multiplier, sample_rate, steps)`` entries of an Opacus accountant's
history and of the site's privacy ledger.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class GaussianSteps(NamedTuple):
    """A ledger entry: ``steps`` releases with noise std = ``noise_multiplier`` x sensitivity, at ``sample_rate``.

    A plain tuple, so ``ledger.record(*steps)`` and Opacus' ``accountant.history.append(steps)`` take it as is.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int


def gaussian_delta(noise_multiplier: float, epsilon: float) -> float:
    """The exact delta of one Gaussian-mechanism release at ``epsilon`` (Balle & Wang 2018, Theorem 8).

    With noise std ``sigma`` = noise multiplier x sensitivity:
    ``delta = Phi(1/(2 sigma) - epsilon sigma) - e^epsilon Phi(-1/(2 sigma) - epsilon sigma)``
    (sensitivity scaled to 1).
    """
    if noise_multiplier <= 0:
        return 1.0
    a, b = 1.0 / (2.0 * noise_multiplier), epsilon * noise_multiplier
    return max(0.0, _normal_cdf(a - b) - math.exp(epsilon) * _normal_cdf(-a - b))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest noise std for which one Gaussian release is (epsilon, delta)-DP (analytic Gaussian mechanism).

    Exact for a single release at sample rate 1 (Balle & Wang, "Improving the
    Gaussian Mechanism for Differential Privacy", ICML 2018), unlike the
    classical ``sqrt(2 ln(1.25/delta)) / epsilon``, which needs epsilon < 1.
    The answer is the upper end of a bisection, so its delta is at most the
    target. Opacus' PRV accountant reports about ``epsilon + 0.01`` for this
    sigma (its numerical error bound) and RDP more (8.6 at a target of 8): if the
    ledger must show at most the target, calibrate with the ledger's own
    accountant instead (``calibrate_noise_multiplier(epsilon, delta, 1.0, 1, accountant)``).
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon {epsilon!r}: use a positive finite number, e.g. 8")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta {delta!r}: use a value strictly between 0 and 1, e.g. 1e-5")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"sensitivity {sensitivity!r}: use the release's positive L2 sensitivity")
    low, high = 0.0, 1.0
    while gaussian_delta(high, epsilon) > delta:
        low, high = high, 2.0 * high
    for _ in range(100):
        middle = (low + high) / 2.0
        if gaussian_delta(middle, epsilon) > delta:
            low = middle
        else:
            high = middle
    return high * sensitivity


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))
