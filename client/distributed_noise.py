"""A site's share of distributed discrete Gaussian noise under secure aggregation, and what the ledger records for it.

Under secure aggregation the server sees only the sum over sites, so the
noise that protects a record need not come from its own site alone: each
site adds discrete Gaussian noise ``N_Z(0, local_sigma^2)`` to its integer
sums (quantised by :mod:`fedcl.secure_quantization`), and the sum of the
honest sites' shares protects every record in the aggregate. This is the
distributed discrete Gaussian mechanism of Kairouz, Liu and Steinke ("The
Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", ICML 2021, arXiv:2102.06387). A sum of discrete Gaussians is
not exactly a discrete Gaussian; Proposition 14 of the paper bounds its
Renyi divergence (:func:`ddg_rdp`), and :func:`gaussian_equivalent_steps`
turns that bound into one ordinary ledger entry that dominates it at every
order, so the site's ledger (Opacus Gaussian entries, ``client/privacy_ledger.py``)
stays an upper bound.

The first release to use it is the nearest-class-mean class-sum release
(``client/nearest_class_mean.py``): a record moves one class sum by its
quantised row, whose L2 norm is at most ``norm_bound`` in the integer domain
(:func:`fedcl.secure_quantization.rounded_norm_bound`); that is the L2
sensitivity here, and :func:`l1_sensitivity_bound` the L1 one.

Trust assumption: at least ``n_honest`` of the sites whose words are in the
secure sum are honest, i.e. each added its own fresh share of noise of std
``local_sigma`` and keeps it secret. The accountant counts only those
``n_honest`` shares; other sites' noise may be known to (or withheld by) the
adversary. If the round could end with fewer than ``n_honest`` honest
contributions in the sum (dropouts, sites the server controls, a secure
aggregation threshold below ``n_honest``), the noise falls short of what the
ledger records and the caller must refuse the round. Nothing in this module
can check that; it only prices the mechanism under the assumption.

Randomness: :func:`discrete_gaussian_noise` draws from OpenDP's exact
discrete Gaussian sampler, fed by OpenDP's cryptographically secure RNG.
It cannot be seeded, so unlike :class:`client.secure_noise.NoiseSource`
there is no reproducible test mode: tests check its distribution
statistically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from client.gaussian_release import GaussianSteps

MIN_LOCAL_SIGMA = 0.5  # Proposition 14 of arXiv:2102.06387 assumes sigma >= 1/2
MAX_TAU_TERM = 1e-6  # gaussian_equivalent_steps refuses tau x d above this: the conservative entry would cost much


def discrete_gaussian_noise(shape: int | Sequence[int], sigma: float) -> np.ndarray:
    """Independent draws of the discrete Gaussian ``N_Z(0, sigma^2)`` (``P(k) ~ exp(-k^2 / (2 sigma^2))``), int64.

    ``sigma`` is the scale parameter (the std of the continuous Gaussian it
    discretises; the discrete one's variance is at most ``sigma^2`` and
    within 1e-12 of it for ``sigma >= 1.5``); ``sigma = 0`` gives zeros.

    The draws come from OpenDP (``opendp.measurements.make_gaussian`` on
    an integer vector domain, applied to a zero vector): the exact sampler of
    Canonne, Kamath and Steinke (NeurIPS 2020), which works in integer and
    rational arithmetic (no floating point, so no low-order-bit leaks of
    the kind Mironov 2012 showed for floating-point noise), with every
    random bit from OpenDP's RNG, documented as cryptographically secure (its
    ``fill_bytes``; the wheel bundles OpenSSL).
    It is used rather than code of our own because an exact sampler is easy
    to get subtly wrong (a truncated tail, a biased Bernoulli, a float
    comparison) in ways no test of its moments would catch, while OpenDP's
    comes with a written proof per function and is maintained for DP use.
    Cost: about 0.7 to 1 s of CPU for 60,000 coordinates, whatever sigma
    (measured here with OpenDP 0.16); the first call in a process also loads
    OpenDP's library (about 1 s).
    """
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape}: use sizes >= 0")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.integer, np.floating)):
        raise ValueError(f"sigma {sigma!r}: use a number (local_sigma_for gives it)")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma {sigma!r}: use a finite noise scale >= 0 (local_sigma_for gives it)")
    count = math.prod(shape)
    if sigma == 0 or count == 0:
        return np.zeros(shape, dtype=np.int64)
    import opendp.prelude as dp

    dp.enable_features("contrib")  # make_gaussian is in OpenDP's "contrib" set (proved, not yet vetted)
    space = dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="i64")
    sampler = dp.m.make_gaussian(*space, scale=float(sigma))
    return np.asarray(sampler([0] * count), dtype=np.int64).reshape(shape)


def ddg_tau(local_sigma: float, n_honest: int) -> float:
    """``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k+1))`` of Proposition 14 (arXiv:2102.06387).

    How far the sum of ``n_honest`` discrete Gaussians of scale
    ``local_sigma`` is from one discrete Gaussian; 0 for one site.
    """
    _check_sigma_and_sites(local_sigma, n_honest)
    k = np.arange(1, n_honest, dtype=np.float64)
    return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * local_sigma**2 * k / (k + 1.0))))


def ddg_rdp(
    orders: float | Sequence[float] | np.ndarray,
    l2_sensitivity: float,
    l1_sensitivity: float,
    local_sigma: float,
    n_honest: int,
    dim: int,
) -> np.ndarray:
    """Renyi DP of the distributed discrete Gaussian at each order (Kairouz et al. 2021, Proposition 14 / Eq. 17).

    ``n_honest`` independent shares of ``N_Z(0, local_sigma^2)^dim``, summed,
    added to an integer vector whose change between adjacent datasets has L2
    norm <= ``l2_sensitivity`` and L1 norm <= ``l1_sensitivity`` (both in
    the integer domain: scaled and rounded). With ``s = sqrt(n) * local_sigma``,
    ``a = l2_sensitivity / s``, ``b = l1_sensitivity / s``, ``tau`` from
    :func:`ddg_tau`, the divergence of order ``alpha`` is at most
    ``min(alpha/2 a^2 + tau d, alpha/2 (a^2 + 2 b tau + tau^2 d), alpha/2 (a + sqrt(d) tau)^2)``.

    ``dim`` is the number of coordinates of the noised vector (every
    released coordinate: safe even though one record moves only one class
    row). Orders must be >= 1; the proposition assumes ``local_sigma >= 1/2``
    (smaller raises ``ValueError``). Returns float64, one value per order.
    """
    alphas = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if alphas.ndim != 1 or len(alphas) == 0 or not np.all(alphas >= 1.0) or not np.all(np.isfinite(alphas)):
        raise ValueError(f"orders {orders!r}: use finite Renyi orders >= 1 (e.g. Opacus' RDPAccountant.DEFAULT_ALPHAS)")
    if not (math.isfinite(l2_sensitivity) and l2_sensitivity >= 0):
        raise ValueError(f"l2_sensitivity {l2_sensitivity!r}: use the integer-domain norm bound (rounded_norm_bound)")
    if not (math.isfinite(l1_sensitivity) and l1_sensitivity >= 0):
        raise ValueError(f"l1_sensitivity {l1_sensitivity!r}: use l1_sensitivity_bound(l2_sensitivity, dim)")
    _check_dim(dim)
    tau = ddg_tau(local_sigma, n_honest)
    s = math.sqrt(n_honest) * local_sigma
    a, b = l2_sensitivity / s, l1_sensitivity / s
    first = alphas / 2.0 * a**2 + tau * dim
    second = alphas / 2.0 * (a**2 + 2.0 * b * tau + tau**2 * dim)
    third = alphas / 2.0 * (a + math.sqrt(dim) * tau) ** 2
    return np.minimum(np.minimum(first, second), third)


def l1_sensitivity_bound(l2_sensitivity: float, dim: int) -> float:
    """An L1 bound for integer vectors of L2 norm <= ``l2_sensitivity`` in ``dim`` dimensions.

    ``l2 * min(sqrt(dim), l2)``: Cauchy-Schwarz gives ``||x||_1 <= sqrt(d) ||x||_2``,
    and for integers ``|x_i| <= x_i^2`` gives ``||x||_1 <= ||x||_2^2``.
    """
    if not (math.isfinite(l2_sensitivity) and l2_sensitivity >= 0):
        raise ValueError(f"l2_sensitivity {l2_sensitivity!r}: use the integer-domain norm bound (rounded_norm_bound)")
    _check_dim(dim)
    return float(l2_sensitivity) * min(math.sqrt(dim), float(l2_sensitivity))


def gaussian_equivalent_steps(
    l2_sensitivity: float,
    local_sigma: float,
    n_honest: int,
    dim: int,
    max_tau_term: float = MAX_TAU_TERM,
) -> GaussianSteps:
    """One ledger entry ``(z, 1.0, 1)``: Gaussian RDP ``alpha / (2 z^2)`` >= :func:`ddg_rdp` at every order >= 1.

    Derivation: :func:`ddg_rdp` is at most its first term
    ``alpha/2 a^2 + tau d`` (``a = l2_sensitivity / (sqrt(n) local_sigma)``).
    With ``1/z^2 = a^2 + 2 tau d``, ``alpha / (2 z^2) = alpha/2 a^2 + alpha tau d``,
    which is >= ``alpha/2 a^2 + tau d`` for every ``alpha >= 1``. So composing
    this entry with Opacus' RDP, as the ledger does, bounds the true
    divergence at every order, whatever the L1 sensitivity.

    The entry over-charges by ``alpha tau d`` at order ``alpha``; raises
    ``ValueError`` if ``tau d > max_tau_term`` (1e-6), when that would no
    longer be negligible, rather than silently costing budget. The fix is a
    larger ``local_sigma``: at the same noise multiplier, a larger scale (a
    finer granularity) raises it; ``local_sigma >= 2`` makes ``tau``
    negligible for any practical ``dim``.
    """
    if not (math.isfinite(l2_sensitivity) and l2_sensitivity > 0):
        raise ValueError(f"l2_sensitivity {l2_sensitivity!r}: use the positive integer-domain norm bound")
    _check_dim(dim)
    tau = ddg_tau(local_sigma, n_honest)
    if tau * dim > max_tau_term:
        raise ValueError(
            f"tau x dim = {tau * dim:.3g} > {max_tau_term:g} at local sigma {local_sigma:g} with {n_honest} honest "
            f"sites in dimension {dim}: the sum of discrete Gaussians is too far from a Gaussian for a cheap ledger "
            "entry; raise the local sigma (at the same noise multiplier a larger scale, i.e. a finer granularity, "
            "raises it; a local sigma of 2 or more makes tau negligible)"
        )
    s = math.sqrt(n_honest) * local_sigma
    # x (1 + 1e-12): at alpha = 1 the two sides are equal, and floating-point rounding must not put the entry below.
    inverse_square = ((l2_sensitivity / s) ** 2 + 2.0 * tau * dim) * (1.0 + 1e-12)
    return GaussianSteps(1.0 / math.sqrt(inverse_square), 1.0, 1)


def local_sigma_for(noise_multiplier: float, l2_sensitivity_scaled: float, n_honest: int) -> float:
    """Each site's integer-domain noise std, so that ``n_honest`` shares total ``noise_multiplier x sensitivity``.

    ``noise_multiplier * l2_sensitivity_scaled / sqrt(n_honest)``: the
    variances of independent shares add, so ``n_honest`` of them have std
    ``noise_multiplier * l2_sensitivity_scaled``. If more sites than
    ``n_honest`` take part, the aggregate gets more noise than the ledger
    counts (safe, less accurate); if fewer honest ones do, the round must be
    refused.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier {noise_multiplier!r}: use a finite value >= 0")
    if not (math.isfinite(l2_sensitivity_scaled) and l2_sensitivity_scaled > 0):
        raise ValueError(
            f"l2_sensitivity_scaled {l2_sensitivity_scaled!r}: use the integer-domain norm bound (rounded_norm_bound)"
        )
    _check_sites(n_honest)
    return float(noise_multiplier) * float(l2_sensitivity_scaled) / math.sqrt(n_honest)


def _check_sites(n_honest: int) -> None:
    if isinstance(n_honest, bool) or not isinstance(n_honest, (int, np.integer)) or n_honest < 1:
        raise ValueError(f"n_honest {n_honest!r}: use the number of sites trusted to add noise, a whole number >= 1")


def _check_sigma_and_sites(local_sigma: float, n_honest: int) -> None:
    _check_sites(n_honest)
    if not (math.isfinite(local_sigma) and local_sigma >= MIN_LOCAL_SIGMA):
        raise ValueError(
            f"local sigma {local_sigma!r}: the accountant (Proposition 14 of arXiv:2102.06387) needs >= "
            f"{MIN_LOCAL_SIGMA}; raise the noise multiplier or the scale"
        )


def _check_dim(dim: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim {dim!r}: use the number of noised coordinates, a whole number >= 1")
