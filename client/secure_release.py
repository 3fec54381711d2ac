"""The ncm class-sum release under secure aggregation: quantised sums, a distributed noise share, masked words.

What a site runs in the ncm phase of a secure round (``client/site_round.py``
chooses it when the round carries a mask request):

1. the rows ``[a x, b]`` of the plain release
   (``strategies.ncm_sums.with_count_coordinate``: norm 1) are quantised by
   conditional randomised rounding (``fedcl.secure_quantization.quantize_records``,
   scale and norm bound from ``fedcl/secure_ncm.py``, a fresh unseeded
   generator per release), so one record moves one class sum by at most
   ``norm_bound`` in the integer domain;
2. the integer class sums of the experience's classes (every one, held or
   not) get this site's share of distributed discrete Gaussian noise, of
   std ``local_sigma = z * norm_bound / sqrt(n_h)`` (``n_h`` the run's
   ``secagg-min-honest``, ``z`` the site's noise multiplier);
3. the sums are wrapped mod ``2**bits`` and masked (``fedcl.secure_aggregation``);
   only the masked words leave.

The ledger records :attr:`DistributedRelease.mechanism`: one Gaussian entry
``(z', 1, 1)`` from ``client.distributed_noise.gaussian_equivalent_steps``,
whose RDP dominates the distributed discrete Gaussian's at every order, with
``z' >= z`` (so the plan the budget calibrated still fits). That holds if at
least ``n_h`` honest sites' shares are in the unmasked sum: with at most ``c``
colluders, each site refuses to mask or unmask a round with fewer than
``n_h + c`` sites (``client/secure_stages.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from client.distributed_noise import discrete_gaussian_noise, gaussian_equivalent_steps, local_sigma_for
from client.mechanisms import RecordGroups, SgdMechanism
from fedcl.secure_ncm import SCALE, norm_bound, records_bound, sum_bits
from fedcl.secure_quantization import quantize_records, to_modular

LOCAL_SIGMA_MARGIN = 1e-9  # the local sigma is raised by this share, so the ledger entry is not below z by rounding
BITS_TOO_NARROW = (
    "the round's word width is below the one this site computes from public values (num-sites, max-train-examples, "
    "its noise level and the model size): the sum could wrap round, so the site takes no part"
)


class BitWidthError(ValueError):
    """The round's bit width cannot hold the sum; ``str(error)`` is the fixed public :data:`BITS_TOO_NARROW`."""


@dataclass(frozen=True)
class SecureRound:
    """What a site needs from a secure round's mask request to release: ``n_h``, the bit width, the masker.

    ``mask(words)`` takes the release's words (1-D, in ``[0, 2**bits)``),
    returns the masked int64 words and saves the site's protocol state
    before returning (``client/secure_stages.py``).
    """

    honest_sites: int
    num_sites: int
    max_train_examples: int
    bits: int
    mask: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DistributedRelease:
    """The exact mechanism of one secure class-sum release: every field public (plan, policy, model size)."""

    noise_multiplier: float  # z: the site's budget's choice, as for a plain release
    honest_sites: int  # n_h
    dim: int  # a released row's coordinates: the feature dimension plus the count column
    classes: tuple[int, ...]  # the experience's classes: the rows that get noise
    local_sigma: float  # this site's integer-domain noise std
    reads: RecordGroups | None

    @property
    def norm_bound(self) -> float:
        """A record's L2 sensitivity in the integer domain."""
        return norm_bound(self.dim)

    @property
    def coordinates(self) -> int:
        """The noised coordinates: every row of the experience's classes."""
        return len(self.classes) * self.dim

    @property
    def ledger_steps(self):
        """The ledger entry that dominates the distributed discrete Gaussian (``gaussian_equivalent_steps``)."""
        return gaussian_equivalent_steps(self.norm_bound, self.local_sigma, self.honest_sites, self.coordinates)

    @property
    def mechanism(self) -> SgdMechanism:
        """What the site's budget prices and records: one Gaussian step at rate 1 at the entry's noise multiplier."""
        return SgdMechanism(self.ledger_steps.noise_multiplier, 1.0, 1, 1.0, 1.0, self.reads)

    @property
    def noise_variance(self) -> float:
        """This share's noise variance per coordinate, in feature units (public: a function of z and n_h)."""
        return (self.local_sigma / SCALE) ** 2


def distributed_release(
    noise_multiplier: float, honest_sites: int, dim: int, classes: Sequence[int], reads: RecordGroups | None
) -> DistributedRelease:
    """The release at the site's noise multiplier ``z``: local sigma ``z * norm_bound / sqrt(n_h)`` (x 1 + 1e-9).

    Raises ValueError when the dominating ledger entry would fall below ``z``
    (the sum of discrete Gaussians too far from a Gaussian: raise the scale),
    so the site never records less than its budget planned.
    """
    rows = tuple(sorted({int(c) for c in classes}))
    if not rows:
        raise ValueError("no classes to release; pass the experience's label ids")
    local = local_sigma_for(noise_multiplier, norm_bound(dim), honest_sites) * (1.0 + LOCAL_SIGMA_MARGIN)
    release = DistributedRelease(float(noise_multiplier), int(honest_sites), int(dim), rows, local, reads)
    if release.ledger_steps.noise_multiplier < noise_multiplier:
        raise ValueError(
            f"the distributed release's ledger entry {release.ledger_steps.noise_multiplier:.6g} is below the budget's "
            f"noise multiplier {noise_multiplier:.6g}: raise the quantisation scale (fedcl/secure_ncm.py SCALE)"
        )
    return release


def secure_class_sums(
    rows: np.ndarray, labels: np.ndarray, num_classes: int, release: DistributedRelease, rng: np.random.Generator
) -> np.ndarray:
    """Integer class sums of the quantised ``rows`` plus this site's noise share on ``release.classes``: int64 [C, dim].

    ``rows``: ``[a x, b]`` rows of norm <= 1 (``with_count_coordinate``);
    ``rng``: ``np.random.default_rng()`` in a deployment (fresh, unseeded).
    Raises ValueError when a row outside the release's classes has records.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    rows = np.asarray(rows, dtype=np.float64).reshape(len(labels), release.dim)
    ints = quantize_records(rows, SCALE, release.norm_bound, rng)
    sums = np.zeros((num_classes, release.dim), dtype=np.int64)
    np.add.at(sums, labels, ints)
    others = np.setdiff1d(np.arange(num_classes), release.classes)
    if np.any(sums[others] != 0):
        raise ValueError("the sums hold records of classes outside the release's classes; release every such class")
    classes = list(release.classes)
    sums[classes] += discrete_gaussian_noise((len(classes), release.dim), release.local_sigma)
    return sums


def check_bit_width(release: DistributedRelease, secure: SecureRound, coordinates: int) -> None:
    """Raise :class:`BitWidthError` when ``secure.bits`` is narrower than this site's own width for the sum.

    The site's width is :func:`fedcl.secure_ncm.sum_bits` of
    ``secure.num_sites`` sites (``max(num-sites, the round's sites)``), the
    public record bound, its local noise and the release's ``coordinates``:
    every input is public, so the refusal is a fixed public reason. Run it
    before anything is computed or spent.
    """
    try:
        needed = sum_bits(
            secure.num_sites,
            records_bound(secure.max_train_examples),
            release.norm_bound,
            release.local_sigma,
            int(coordinates),
        )
    except ValueError:
        raise BitWidthError(BITS_TOO_NARROW) from None
    if secure.bits < needed:
        raise BitWidthError(BITS_TOO_NARROW)


def masked_release(sums: np.ndarray, release: DistributedRelease, secure: SecureRound) -> np.ndarray:
    """The noised integer sums wrapped mod ``2**bits`` and masked: int64 of ``sums``' shape, all that leaves.

    Raises :class:`BitWidthError` when ``secure.bits`` is narrower than this
    site's own width (:func:`check_bit_width`): the sum could wrap round.
    """
    check_bit_width(release, secure, int(np.size(sums)))
    words = to_modular(np.asarray(sums, dtype=np.int64).reshape(-1), secure.bits)
    return np.asarray(secure.mask(words), dtype=np.int64).reshape(np.shape(sums))
