"""Integers for secure aggregation: quantise records, bound their norm, wrap sums modulo 2**bits, and back.

Secure aggregation adds vectors of integers modulo ``2**bits``; the server
learns only the sum over sites. A private release that goes through it (the
distributed discrete Gaussian of Kairouz, Liu and Steinke, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
ICML 2021, arXiv:2102.06387) works on integers from end to end:

1. each site scales every record's row (L2 norm <= 1) by ``scale`` (= 1 / the
   granularity gamma) and rounds it to integers with *conditional randomised
   rounding* (:func:`quantize_records`, the paper's section 4 and Theorem 1):
   each coordinate rounds up with probability equal to its fractional part
   (unbiased), and a row is re-rounded until its L2 norm is at most
   ``norm_bound``. That check, not the rounding's expectation, is what
   bounds a record's L2 sensitivity in the integer domain: at most
   ``norm_bound`` whatever the draws (:func:`rounded_norm_bound` picks it);
2. the site sums its integer rows, adds its share of discrete Gaussian noise
   (``client/distributed_noise.py``) and wraps the result into
   ``[0, 2**bits)`` (:func:`to_modular`);
3. secure aggregation adds the sites' words modulo ``2**bits``; the server
   centres the sum back into ``[-2**(bits-1), 2**(bits-1))``
   (:func:`from_modular`) and divides by ``scale`` (:func:`dequantize`).

The centred sum equals the true integer sum only if ``|sum| < 2**(bits-1)``
on every coordinate; otherwise it wraps round (a utility failure, not a
privacy one: wrapping is post-processing of the private sum).
:func:`check_sum_fits` refuses a bit width that does not hold the sum with
overwhelming probability; :func:`bits_needed` gives the width that does.

Trust assumption (the privacy argument this module serves): the server sees
only the modular sum, and at least ``n_honest`` of the sites in that sum
are honest, i.e. ran these steps and added their share of the noise. If
fewer than ``n_honest`` honest contributions can be in the sum (dropouts,
sites the server controls), the noise falls short of what the ledger
records, and the caller must refuse the round. Nothing here can check it.

numpy only (no torch): the server, which does not import torch, unwraps and
dequantises with the same code the sites use to quantise and wrap.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

MAX_ROUNDING_TRIES = 100  # re-roundings of a row before giving up (see quantize_records)
INPUT_NORM_SLACK = 1e-9  # a row clipped to norm 1 in floating point may come out at 1 + a few ulps
MAX_BITS = 64  # the words are uint64
OVERFLOW_PROBABILITY = 1e-9  # default: the chance that the noise pushes any coordinate of the sum out of range


def quantize_records(rows: np.ndarray, scale: float, norm_bound: float, rng: np.random.Generator) -> np.ndarray:
    """Conditional randomised rounding of ``scale * rows``: int64 ``[N, d]``, every row's L2 norm <= ``norm_bound``.

    ``rows`` (float ``[N, d]``) must already be clipped to L2 norm <= 1 (the
    caller's clipping; a row above ``1 + 1e-9`` raises ``ValueError``).
    Each coordinate ``x`` of ``scale * row`` becomes ``floor(x) + B`` with
    ``B ~ Bernoulli(x - floor(x))``, so the unconditioned rounding is
    unbiased; a rounded row whose L2 norm exceeds ``norm_bound`` is drawn
    again (only that row), at most ``MAX_ROUNDING_TRIES`` times. Every row
    returned therefore has norm <= ``norm_bound``: that is the record's L2
    sensitivity in the integer domain, whatever the draws. Conditioning on
    the norm biases the rounding by at most about the rejection probability
    (``beta`` of :func:`rounded_norm_bound`); with ``norm_bound = scale +
    sqrt(d)`` (beta = 0) nothing is ever rejected and the rounding is exactly
    unbiased.

    ``rng``: in a deployment ``np.random.default_rng()`` (seeded from the OS,
    a fresh one per release), never a fixed or shared seed. The privacy
    argument averages over rounding draws the adversary does not know: with
    known draws, adding a record can shift which draws the other records get,
    and the sum then moves by more than ``norm_bound``. A fixed seed is for
    tests only.

    Raises ``ValueError`` if a row cannot be rounded within ``norm_bound`` in
    ``MAX_ROUNDING_TRIES`` draws (the bound is too tight for the scale and
    dimension: use ``rounded_norm_bound(scale, d, beta)``).
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"rows of shape {rows.shape}: pass a 2-D array, one record per row")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale {scale!r}: use a positive finite number (1 / the granularity, e.g. 2**8)")
    if not (math.isfinite(norm_bound) and norm_bound > 0):
        raise ValueError(f"norm_bound {norm_bound!r}: use rounded_norm_bound(scale, dim, beta), a positive number")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng {rng!r}: pass a numpy Generator (np.random.default_rng() in a deployment)")
    if not np.all(np.isfinite(rows)):
        raise ValueError("rows hold NaN or infinite values: clip finite feature rows to norm 1 first")
    norms = np.linalg.norm(rows, axis=1)
    if len(rows) and norms.max() > 1.0 + INPUT_NORM_SLACK:
        worst = int(np.argmax(norms))
        raise ValueError(
            f"row {worst} has L2 norm {norms[worst]:.6g} > 1: clip every row to norm 1 before quantising "
            "(rows / np.maximum(norms, 1))"
        )
    if (float(scale) + math.sqrt(rows.shape[1])) ** 2 >= 2.0**62:
        raise ValueError(f"scale {scale:g} in dimension {rows.shape[1]} overflows int64 norms: lower the scale")
    scaled = rows * float(scale)
    floor = np.floor(scaled)
    fraction = scaled - floor
    out = np.empty(scaled.shape, dtype=np.int64)
    pending = np.arange(len(rows))
    # A rounded row's squared norm is an integer, so "norm <= norm_bound" is exactly "squared norm <= floor(bound^2)",
    # with bound^2 taken exactly (a float is a rational): no floating-point rounding can admit a row above the bound.
    threshold = min(math.floor(Fraction(float(norm_bound)) ** 2), 2**62)  # every squared norm is < 2**62
    for _ in range(MAX_ROUNDING_TRIES):
        if len(pending) == 0:
            break
        part = fraction[pending]
        rounded = (floor[pending] + (rng.random(part.shape) < part)).astype(np.int64)
        fits = np.einsum("ij,ij->i", rounded, rounded) <= threshold  # every |coordinate| <= scale + 1: no overflow
        out[pending[fits]] = rounded[fits]
        pending = pending[~fits]
    if len(pending):
        first = int(pending[0])
        raise ValueError(
            f"{len(pending)} row(s) (first: row {first}, scaled norm {norms[first] * scale:.6g}) could not be rounded "
            f"to L2 norm <= {norm_bound:.6g} in {MAX_ROUNDING_TRIES} draws: the bound is too tight for scale "
            f"{scale:g} in dimension {rows.shape[1]}; use norm_bound = rounded_norm_bound(scale, dim, beta)"
        )
    return out


def rounded_norm_bound(l2_bound_scaled: float, dim: int, beta: float) -> float:
    """The L2 norm bound for conditional randomised rounding (Kairouz et al. 2021, Theorem 1).

    For a vector of L2 norm <= ``c = l2_bound_scaled`` in ``dim``
    dimensions (already scaled, granularity 1), randomised rounding gives a
    norm <= ``min(c + sqrt(d), sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)))``
    with probability >= ``1 - beta``. The first term holds always (each
    coordinate moves by < 1), so ``beta = 0`` gives ``c + sqrt(d)`` and no
    rejection. ``beta`` in ``[0, 1)``; the paper's experiments use
    ``exp(-0.5)``. The smaller the bound, the smaller the sensitivity and the
    more re-roundings (and conditioning bias) :func:`quantize_records` incurs.
    """
    if not (math.isfinite(l2_bound_scaled) and l2_bound_scaled >= 0):
        raise ValueError(f"l2_bound_scaled {l2_bound_scaled!r}: use scale x the clipping norm, a number >= 0")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim {dim!r}: use the number of coordinates of a row, a whole number >= 1")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta {beta!r}: use a probability in [0, 1), e.g. math.exp(-0.5)")
    c, root_d = float(l2_bound_scaled), math.sqrt(dim)
    always = c + root_d
    if beta == 0.0:
        return always
    likely = math.sqrt(c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + root_d / 2.0))
    return min(always, likely)


def to_modular(values: np.ndarray, bits: int) -> np.ndarray:
    """``values mod 2**bits`` as uint64 in ``[0, 2**bits)`` (two's complement for negatives).

    ``values`` must be an integer array (int64 or narrower, or unsigned); the
    sum of such words with numpy's uint64 wrap-around, unwrapped by
    :func:`from_modular`, is the integer sum modulo ``2**bits``.
    """
    bits = _check_bits(bits)
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"values of dtype {values.dtype}: quantise to integers first (quantize_records)")
    words = values.astype(np.uint64)  # int64 -> uint64 is value mod 2**64, two's complement
    return words & _mask(bits)


def from_modular(values: np.ndarray, bits: int) -> np.ndarray:
    """The int64 in ``[-2**(bits-1), 2**(bits-1))`` congruent to each ``values mod 2**bits``.

    ``values`` are uint64 words, e.g. a sum of :func:`to_modular` words taken
    with numpy's wrap-around (mod ``2**64``, a multiple of ``2**bits``), so
    only their low ``bits`` bits count. Any integer dtype is read the same
    way (e.g. the int64 sum in ``[0, 2**bits)`` of ``fedcl.secure_aggregation``). The result is the true integer sum
    exactly when that sum lies in the centred range (:func:`check_sum_fits`).
    """
    bits = _check_bits(bits)
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"values of dtype {values.dtype}: pass the integer words of to_modular (or their sum)")
    words = values.astype(np.uint64) & _mask(bits)  # any integer dtype: the cast is mod 2**64, a multiple of 2**bits
    if bits == MAX_BITS:
        return words.view(np.int64)
    signed = words.astype(np.int64)  # < 2**63: exact
    return np.where(signed >= 1 << (bits - 1), signed - (1 << bits), signed)


def bits_needed(max_abs_sum: float) -> int:
    """The smallest bit width whose centred range ``[-2**(bits-1), 2**(bits-1))`` holds ``|x| <= max_abs_sum``.

    The sums are integers, so ``|x| <= floor(max_abs_sum)``; the result may exceed 64 (then no word holds it).
    """
    if not (math.isfinite(max_abs_sum) and max_abs_sum >= 0):
        raise ValueError(f"max_abs_sum {max_abs_sum!r}: use a finite bound >= 0 on |sum| (sum_abs_bound)")
    return int(math.floor(max_abs_sum)).bit_length() + 1


def noise_tail_stds(coordinates: int, failure_probability: float = OVERFLOW_PROBABILITY) -> float:
    """``k``: the noise passes ``k`` stds on some of ``coordinates`` with probability <= ``failure_probability``.

    ``k = sqrt(2 ln(2 coordinates / failure_probability))``: a sum of
    independent discrete Gaussians of parameters ``sigma_i`` is
    subgaussian with variance proxy ``sum sigma_i^2`` (Canonne, Kamath,
    Steinke 2020), so ``P(|noise| >= k s) <= 2 exp(-k^2 / 2)`` per
    coordinate, with ``s^2 = sum sigma_i^2``; a union bound over the
    coordinates gives the rest. About 8.1 for 60,000 coordinates at 1e-9.
    """
    if isinstance(coordinates, bool) or not isinstance(coordinates, int) or coordinates < 1:
        raise ValueError(f"coordinates {coordinates!r}: use the number of summed coordinates, a whole number >= 1")
    if not 0.0 < failure_probability < 1.0:
        raise ValueError(f"failure_probability {failure_probability!r}: use a small probability, e.g. 1e-9")
    return math.sqrt(2.0 * math.log(2.0 * coordinates / failure_probability))


def sum_abs_bound(
    signal_bound: float,
    total_noise_std: float,
    coordinates: int,
    failure_probability: float = OVERFLOW_PROBABILITY,
) -> float:
    """A bound on ``|sum|`` over every coordinate, holding with probability >= ``1 - failure_probability``.

    ``signal_bound`` bounds ``|sum of the rounded records|`` per coordinate
    (deterministically: e.g. records x ``norm_bound``, as a coordinate is at
    most its row's L2 norm). ``total_noise_std`` is ``sqrt(sum of the local
    sigma^2)`` over *every* site whose noise is in the sum (not just the
    honest ones the accountant counts). Returns
    ``signal_bound + k * total_noise_std`` with ``k`` from
    :func:`noise_tail_stds`.
    """
    if not (math.isfinite(signal_bound) and signal_bound >= 0):
        raise ValueError(f"signal_bound {signal_bound!r}: use a finite bound >= 0 on |sum of the records|")
    if not (math.isfinite(total_noise_std) and total_noise_std >= 0):
        raise ValueError(f"total_noise_std {total_noise_std!r}: use sqrt(sites) x the local sigma, a number >= 0")
    return float(signal_bound) + noise_tail_stds(coordinates, failure_probability) * float(total_noise_std)


def check_sum_fits(
    bits: int,
    signal_bound: float,
    total_noise_std: float,
    coordinates: int,
    failure_probability: float = OVERFLOW_PROBABILITY,
) -> float:
    """Raise ``ValueError`` unless the centred ``bits``-bit range holds :func:`sum_abs_bound`; return that bound.

    The parameters are those of :func:`sum_abs_bound`. The default
    ``failure_probability`` (1e-9) is the chance, over the noise, that some
    coordinate wraps round anyway.
    """
    bits = _check_bits(bits)
    bound = sum_abs_bound(signal_bound, total_noise_std, coordinates, failure_probability)
    needed = bits_needed(bound)
    if needed > bits:
        k = noise_tail_stds(coordinates, failure_probability)
        fix = (
            f"raise the bit width to at least {needed}"
            if needed <= MAX_BITS
            else f"no width up to {MAX_BITS} bits is enough"
        )
        raise ValueError(
            f"the sum may reach |{bound:.6g}| (signal {signal_bound:.6g} + {k:.2f} x total noise std "
            f"{total_noise_std:.6g}), which needs {needed} bits; {bits} given: {fix}, or lower the scale "
            "(both the signal and the noise shrink with it)"
        )
    return bound


def dequantize(sum_ints: np.ndarray, scale: float) -> np.ndarray:
    """The integer sum back in the rows' units: ``sum_ints / scale`` as float64."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale {scale!r}: use the positive finite scale the records were quantised with")
    sum_ints = np.asarray(sum_ints)
    if not np.issubdtype(sum_ints.dtype, np.integer):
        raise ValueError(f"sum_ints of dtype {sum_ints.dtype}: pass the centred integer sum (from_modular)")
    return sum_ints.astype(np.float64) / float(scale)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits {bits!r}: use a whole number from 1 to {MAX_BITS} (the words are uint64)")
    return int(bits)


def _mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)
