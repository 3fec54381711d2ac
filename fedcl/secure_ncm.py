"""The public parameters of the ncm release under secure aggregation, shared by the sites and the server.

Both sides compute them from public values only (the run config and the
constants here), never from a site's records:

- :data:`SCALE` and :data:`BETA` fix the quantisation of every released row
  (``fedcl/secure_quantization.py``); :func:`norm_bound` is a record's L2
  sensitivity in the integer domain;
- :func:`threshold` is the Shamir threshold of a round of ``n`` sites;
- :func:`sum_bits` is the bit width whose centred range holds the sum of the
  sites' words (the signal bound from the public per-site record bound, plus
  the noise tail); the server sends its width in every mask request and each
  site refuses one narrower than its own computation.

numpy only: the server imports it (no torch).
"""

from __future__ import annotations

import math

from fedcl.secure_quantization import bits_needed, rounded_norm_bound, sum_abs_bound

SCALE = 2.0**12  # integer units per feature unit: rounding adds variance <= 1/4 unit^2 per coordinate per record
BETA = math.exp(-0.5)  # conditional rounding's rejection level (Kairouz et al. 2021's experiments)
MAX_BITS = 62  # fedcl.secure_aggregation works mod 2**bits with bits <= 62
UNDECLARED_RECORDS = 10**9  # the per-site record bound when the run config declares none (max-train-examples = 0)
MAX_NOISE_MULTIPLIER = 1e4  # the largest noise multiplier a site's budget chooses (client/site_budget.py MAX_SIGMA)
MAX_COORDINATES = 10**9  # the server's bound on a release's coordinates (the tail grows with their logarithm only)
MAX_ROW_DIM = 2**16  # the server's bound on a released row's dimension (the model's hidden size plus the count)


def norm_bound(dim: int) -> float:
    """A quantised row's L2 norm bound (its sensitivity) for rows of ``dim`` coordinates of norm <= 1."""
    return rounded_norm_bound(SCALE, dim, BETA)


def threshold(sites: int) -> int:
    """The Shamir threshold ``floor(n / 2) + 1`` of a round whose ``sites`` sites advertised keys (2t > n)."""
    if sites < 1:
        raise ValueError(f"sites = {sites}: a secure round needs at least one site that advertised keys")
    return sites // 2 + 1


def sum_bits(num_sites: int, records_per_site: int, row_bound: float, local_sigma: float, coordinates: int) -> int:
    """The bits whose centred range holds the sum of ``num_sites`` releases with probability >= 1 - 1e-9.

    Signal: at most ``records_per_site`` rows of norm <= ``row_bound`` per
    site (a coordinate is at most its row's norm); noise: ``num_sites``
    shares of std ``local_sigma`` on ``coordinates`` coordinates. Raises
    ValueError when more than :data:`MAX_BITS` would be needed (lower the
    scale or the record bound).
    """
    signal = float(num_sites) * float(records_per_site) * float(row_bound)
    bound = sum_abs_bound(signal, math.sqrt(num_sites) * float(local_sigma), int(coordinates))
    bits = bits_needed(bound)
    if bits > MAX_BITS:
        raise ValueError(
            f"the secure sum may reach |{bound:.4g}|, which needs {bits} bits (at most {MAX_BITS}): declare a smaller "
            "per-site record bound (max-train-examples) or use fewer sites per round"
        )
    return bits


def records_bound(max_train_examples: int) -> int:
    """The public per-site record bound: ``max-train-examples`` when set, else :data:`UNDECLARED_RECORDS`."""
    return max_train_examples if max_train_examples > 0 else UNDECLARED_RECORDS


def largest_noise_multiplier(noise_multiplier: float = 0.0) -> float:
    """The largest z a site can use: the run's ``noise-multiplier`` when above :data:`MAX_NOISE_MULTIPLIER`, else it."""
    return max(float(noise_multiplier), MAX_NOISE_MULTIPLIER)


def server_bits(num_sites: int, max_train_examples: int, honest_sites: int, noise_multiplier: float = 0.0) -> int:
    """The bit width the server sends: :func:`sum_bits` at the largest row, noise and release any site can have.

    ``num_sites``: the most sites a round holds; ``noise_multiplier``: the
    run's ``noise-multiplier`` (0: the budget chooses, at most
    :data:`MAX_NOISE_MULTIPLIER`). Every site's own :func:`sum_bits` (with
    its real dimension, noise and coordinates, for ``max(num-sites, the
    round's sites)``) is at most this, so an honest site never refuses it.
    Raises ValueError when the width would pass :data:`MAX_BITS`.
    """
    row = norm_bound(MAX_ROW_DIM)
    local = largest_noise_multiplier(noise_multiplier) * row / math.sqrt(honest_sites)
    return sum_bits(num_sites, records_bound(max_train_examples), row, local, MAX_COORDINATES)
