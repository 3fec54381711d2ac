"""Distributed discrete Gaussian under secure aggregation: sampler, quantisation, modular sums, accountant, end to end.

Every check is against a reference computed another way: the discrete
Gaussian's moments and probabilities summed by hand, Python's big integers,
Opacus' own Gaussian RDP, hand-evaluated values of Proposition 14 of
arXiv:2102.06387, and the plain float class sums. Tolerances are a few
standard errors of the estimate at the sample size used, and each test
names the wrong implementation it would catch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from client.distributed_noise import (
    ddg_rdp,
    ddg_tau,
    discrete_gaussian_noise,
    gaussian_equivalent_steps,
    l1_sensitivity_bound,
    local_sigma_for,
)
from client.gaussian_release import GaussianSteps
from fedcl.secure_quantization import (
    bits_needed,
    check_sum_fits,
    dequantize,
    from_modular,
    noise_tail_stds,
    quantize_records,
    rounded_norm_bound,
    sum_abs_bound,
    to_modular,
)

ORDERS = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]
BETA = math.exp(-0.5)  # the paper's choice for conditional rounding


def gaussian_rdp(noise_multiplier: float, orders: list[float]) -> np.ndarray:
    """The reference: Opacus' RDP of one Gaussian release at sample rate 1."""
    return np.asarray(compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=1, orders=orders))


def discrete_gaussian_moments(sigma: float) -> tuple[float, float, dict[int, float]]:
    """Variance, 4th moment and P(k) for |k| <= 2 of N_Z(0, sigma^2), summed by hand over |k| <= 60 sigma."""
    ks = np.arange(-int(60 * sigma) - 1, int(60 * sigma) + 2)
    weights = np.exp(-(ks.astype(np.float64) ** 2) / (2.0 * sigma**2))
    total = weights.sum()
    pmf = {int(k): float(w / total) for k, w in zip(ks, weights) if abs(k) <= 2}
    return float((ks**2 * weights).sum() / total), float((ks.astype(np.float64) ** 4 * weights).sum() / total), pmf


# --- the sampler ----------------------------------------------------------------


@pytest.mark.parametrize("sigma", [3.0, 0.8])
def test_discrete_gaussian_matches_hand_computed_distribution(sigma):
    draws = 200_000
    noise = discrete_gaussian_noise((draws,), sigma)
    assert noise.dtype == np.int64 and noise.shape == (draws,)
    variance, fourth, pmf = discrete_gaussian_moments(sigma)
    # The sample variance's standard error is sqrt((mu4 - var^2) / n): 5 of them (1.6% at sigma 3, 1.6% at 0.8).
    # Rounding a continuous Gaussian instead would give var + 1/12 (13% off at 0.8), far outside.
    tolerance = 5.0 * math.sqrt((fourth - variance**2) / draws)
    assert abs(noise.astype(np.float64).var() - variance) < tolerance
    assert abs(noise.mean()) < 5.0 * math.sqrt(variance / draws)
    for k, p in pmf.items():  # each probability within 5 binomial standard errors (P(0) = 0.4987 at 0.8; 0.468 rounded)
        assert abs(np.mean(noise == k) - p) < 5.0 * math.sqrt(p * (1 - p) / draws), (k, p)


def test_discrete_gaussian_shapes_and_zero_noise():
    assert discrete_gaussian_noise((3, 4), 2.0).shape == (3, 4)
    assert np.array_equal(discrete_gaussian_noise((2, 5), 0.0), np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="sigma"):
        discrete_gaussian_noise((2,), -1.0)


# --- quantisation -----------------------------------------------------------------


def test_rounded_norm_bound_matches_theorem_by_hand():
    c, d = 64.0, 32
    assert rounded_norm_bound(c, d, 0.0) == pytest.approx(c + math.sqrt(d), rel=1e-15)
    by_hand = math.sqrt(64.0**2 + 32 / 4 + math.sqrt(2 * 0.5) * (64.0 + math.sqrt(32) / 2))  # ln(1/e^-0.5) = 0.5
    assert rounded_norm_bound(c, d, BETA) == pytest.approx(by_hand, rel=1e-12)
    assert rounded_norm_bound(100.0, 1, 1e-300) == pytest.approx(101.0)  # c + sqrt(d) is below the tail bound, 117


def test_quantize_is_unbiased_and_rounds_to_a_neighbour():
    # Scaled coordinates with fractional parts .3, .7, .5, .9 etc.: rounding to nearest would be off by up to 0.3.
    scale = 10.0
    row = np.array([0.33, -0.47, 0.05, 0.29, -0.61, 0.19, 0.0, -0.02])
    row /= np.linalg.norm(row) * 1.0000001  # norm just under 1
    rows = np.tile(row, (20_000, 1))
    bound = rounded_norm_bound(scale, row.size, 0.0)  # beta 0: never rejects, so the rounding is exactly unbiased
    out = quantize_records(rows, scale, bound, np.random.default_rng(1))
    assert out.dtype == np.int64 and out.shape == rows.shape
    scaled = scale * row
    assert np.all((out == np.floor(scaled)) | (out == np.ceil(scaled)))
    # each coordinate is Bernoulli(frac): std <= 0.5, so the mean of 20,000 has standard error <= 0.0036
    assert np.all(np.abs(out.mean(axis=0) - scaled) < 5 * 0.5 / math.sqrt(len(rows)))


def test_quantize_bounds_every_row_where_plain_rounding_does_not():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(3000, 16))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    scale = 4.0
    bound = rounded_norm_bound(scale, 16, BETA)
    out = quantize_records(rows, scale, bound, rng)
    assert np.linalg.norm(out, axis=1).max() <= bound
    # Teeth: unconditioned randomised rounding of the same rows (done here by hand) breaks the bound on some rows,
    # so a quantiser that skipped the check would fail the assertion above.
    scaled = scale * rows
    plain = np.floor(scaled) + (rng.random(scaled.shape) < scaled - np.floor(scaled))
    assert np.linalg.norm(plain, axis=1).max() > bound


def test_quantize_refuses_an_unclipped_row_and_an_impossible_bound():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="clip every row"):
        quantize_records(np.array([[0.8, 0.61]]), 8.0, 20.0, rng)  # norm 1.006
    # 2.5 rounds to 2 or 3: norm 2 is the least any rounding reaches, so a bound of 1.99 cannot be met ...
    with pytest.raises(ValueError, match="rounded_norm_bound"):
        quantize_records(np.array([[1.0, 0.0, 0.0]]), 2.5, 1.99, rng)
    # ... and 2.0 can: every draw comes back as 2
    out = quantize_records(np.tile([1.0, 0.0, 0.0], (50, 1)), 2.5, 2.0, rng)
    assert np.array_equal(out, np.tile([2, 0, 0], (50, 1)))


# --- modular arithmetic -----------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_modular_sum_equals_big_integer_sum_when_it_fits(bits):
    rng = np.random.default_rng(bits)
    parts = 7
    limit = (2 ** (bits - 1) - 1) // parts  # so any sum of `parts` values fits the centred range
    vectors = [rng.integers(-limit, limit, size=200, endpoint=True, dtype=np.int64) for _ in range(parts)]
    vectors[0][:2] = [limit, -limit]  # the extremes
    words = np.stack([to_modular(v, bits) for v in vectors])
    assert words.dtype == np.uint64 and int(words.max()) < 2**bits
    summed = words.sum(axis=0, dtype=np.uint64)  # numpy's uint64 wrap-around
    total = from_modular(summed, bits)
    reference = [sum(int(v[i]) for v in vectors) for i in range(200)]  # Python big integers: no overflow
    assert total.dtype == np.int64 and total.tolist() == reference
    assert from_modular(summed.view(np.int64), bits).tolist() == reference  # the same words held as int64
    with pytest.raises(ValueError, match="integer"):
        from_modular(summed.astype(np.float64), bits)


def test_modular_sum_wraps_when_it_does_not_fit():
    bits = 8
    vectors = [np.array([100, -100, 60]), np.array([100, -100, 70])]  # sums 200, -200, 130: outside [-128, 128)
    total = from_modular(sum(to_modular(v, bits) for v in vectors), bits)
    assert total.tolist() == [200 - 256, -200 + 256, 130 - 256]
    with pytest.raises(ValueError, match="raise the bit width to at least 9"):
        check_sum_fits(bits, signal_bound=200.0, total_noise_std=0.0, coordinates=3)


def test_bits_needed_and_fit_check_by_hand():
    assert [bits_needed(x) for x in (0, 1, 127, 127.9, 128, 2**40)] == [1, 2, 8, 8, 9, 42]
    k = math.sqrt(2 * math.log(2 * 100 / 1e-9))  # union bound over 100 coordinates of 2 exp(-k^2 / 2)
    assert noise_tail_stds(100) == pytest.approx(k, rel=1e-12)
    assert sum_abs_bound(30_000.0, 100.0, 100) == pytest.approx(30_000.0 + 100.0 * k, rel=1e-12)
    assert check_sum_fits(16, 30_000.0, 100.0, 100) == pytest.approx(30_000.0 + 100.0 * k, rel=1e-12)  # 32,278 fits
    with pytest.raises(ValueError, match="raise the bit width to at least 17.*lower the scale"):
        check_sum_fits(16, 30_000.0, 400.0, 100)  # 30,000 + 8.8 x 400 > 32,767
    with pytest.raises(ValueError, match="bits"):
        to_modular(np.array([1]), 65)


# --- the accountant ---------------------------------------------------------------


def test_ddg_rdp_is_opacus_gaussian_when_tau_vanishes():
    local_sigma, n, l2, d = 40.0, 3, 65.0, 1000
    assert ddg_tau(local_sigma, n) == 0.0  # exp(-2 pi^2 1600 / 2) underflows
    rdp = ddg_rdp(ORDERS, l2, l1_sensitivity_bound(l2, d), local_sigma, n, d)
    np.testing.assert_allclose(rdp, gaussian_rdp(math.sqrt(n) * local_sigma / l2, ORDERS), rtol=1e-12)


def test_ddg_tau_and_rdp_by_hand():
    # tau for n = 3, sigma = 1/2: 10 (exp(-2 pi^2 / 4 * 1/2) + exp(-2 pi^2 / 4 * 2/3)) = 10 (e^{-pi^2/4} + e^{-pi^2/3})
    assert ddg_tau(0.5, 3) == pytest.approx(1.2206373471865504, rel=1e-12)
    assert ddg_tau(3.0, 1) == 0.0
    # d = 1, Delta = 1, s^2 = 3/4, alpha = 2: the first term wins, 2/2 * 4/3 + tau = 2.55397...
    assert ddg_rdp(2.0, 1.0, 1.0, 0.5, 3, 1)[0] == pytest.approx(2.5539706805198836, rel=1e-12)
    # n = 2, sigma = 1 (tau = 10 e^{-pi^2}), d = 100, Delta2 = Delta1 = 1, alpha = 1: the second term wins,
    # 1/2 (1/2 + 2 tau / sqrt 2 + 100 tau^2) = 0.250379..., against first 0.301723 and third 0.253671
    assert ddg_rdp(1.0, 1.0, 1.0, 1.0, 2, 100)[0] == pytest.approx(0.25037911459704826, rel=1e-12)
    # with a loose L1 bound of 20 the third term, 1/2 (1/sqrt 2 + 10 tau)^2, wins over the second (0.257328)
    assert ddg_rdp(1.0, 1.0, 20.0, 1.0, 2, 100)[0] == pytest.approx(0.25367075801088435, rel=1e-12)
    with pytest.raises(ValueError, match="needs >= 0.5"):
        ddg_rdp(2.0, 1.0, 1.0, 0.4, 3, 1)


@pytest.mark.parametrize("local_sigma", [1.7, 0.6])
def test_equivalent_entry_dominates_ddg_at_every_order(local_sigma):
    n, l2, d = 5, 10.0, 64
    orders = [1.0, *ORDERS, 256.0, 1024.0]
    exact = ddg_rdp(orders, l2, l1_sensitivity_bound(l2, d), local_sigma, n, d)
    # at 0.6, tau d = 1.6 is far from negligible: allowed here only to test the derivation where it matters
    entry = gaussian_equivalent_steps(l2, local_sigma, n, d, max_tau_term=math.inf)
    assert isinstance(entry, GaussianSteps) and entry.sample_rate == 1.0 and entry.steps == 1
    assert np.all(gaussian_rdp(entry.noise_multiplier, orders) >= exact)
    # Teeth: the Gaussian entry that ignores tau (z = sqrt(n) sigma / Delta2) falls below the bound at every order
    assert np.all(gaussian_rdp(math.sqrt(n) * local_sigma / l2, orders) < exact)


def test_equivalent_entry_is_the_plain_gaussian_when_tau_is_negligible_and_refuses_otherwise():
    z, d, n = 1.0, 33 * 4, 3
    l2 = rounded_norm_bound(2.0**8, 33, BETA)
    sigma = local_sigma_for(z, l2, n)
    entry = gaussian_equivalent_steps(l2, sigma, n, d)
    assert entry.noise_multiplier == pytest.approx(z, rel=1e-9)
    with pytest.raises(ValueError, match="raise the local sigma"):
        gaussian_equivalent_steps(10.0, 0.6, n, d)


def test_fewer_honest_sites_cost_more_epsilon():
    l2, d, delta = 65.0, 128, 1e-5
    sigma = local_sigma_for(1.0, l2, 3)
    l1 = l1_sensitivity_bound(l2, d)
    assumed, _ = get_privacy_spent(orders=ORDERS, rdp=ddg_rdp(ORDERS, l2, l1, sigma, 3, d), delta=delta)
    one_site, _ = get_privacy_spent(orders=ORDERS, rdp=ddg_rdp(ORDERS, l2, l1, sigma, 1, d), delta=delta)
    reference, _ = get_privacy_spent(orders=ORDERS, rdp=gaussian_rdp(1.0, ORDERS), delta=delta)
    assert assumed == pytest.approx(reference, rel=1e-9)  # three shares: the Gaussian of multiplier 1
    assert one_site > 1.5 * assumed  # one share of sigma / sqrt 3 is sqrt(3) times less noise


def test_local_sigma_for_by_hand():
    assert local_sigma_for(2.0, 100.0, 4) == pytest.approx(100.0)  # 2 x 100 / sqrt 4
    assert local_sigma_for(1.0, 30.0, 1) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="n_honest"):
        local_sigma_for(1.0, 30.0, 0)


# --- end to end -------------------------------------------------------------------


def test_three_sites_sum_carries_the_intended_total_noise():
    rng = np.random.default_rng(7)
    sites, records, d, classes, scale, z = 3, 50, 32, 4, 2.0**6, 1.0
    data = []
    for _ in range(sites):
        rows = rng.normal(size=(records, d))
        data.append((rows / np.linalg.norm(rows, axis=1, keepdims=True), rng.integers(0, classes, size=records)))
    plain = np.zeros((classes, d))
    for rows, labels in data:
        np.add.at(plain, labels, rows)
    l2 = rounded_norm_bound(scale, d, BETA)
    local = local_sigma_for(z, l2, sites)
    bits = bits_needed(sum_abs_bound(sites * records * l2, math.sqrt(sites) * local, classes * d))
    check_sum_fits(bits, sites * records * l2, math.sqrt(sites) * local, classes * d)
    assert bits < 20  # small enough that negative noisy sums really wrap

    errors = []
    for _ in range(25):
        words = []
        for rows, labels in data:
            sums = np.zeros((classes, d), dtype=np.int64)
            np.add.at(sums, labels, quantize_records(rows, scale, l2, rng))
            words.append(to_modular(sums + discrete_gaussian_noise((classes, d), local), bits))
        total = from_modular(np.sum(words, axis=0, dtype=np.uint64), bits)
        errors.append(dequantize(total, scale) - plain)
    errors = np.concatenate(errors).ravel()  # 3,200 coordinates

    intended = z * l2 / scale  # the total noise std in the rows' units
    # Randomised rounding adds at most (records of a class) / 4 of variance in integer units: 0.3% of the noise's.
    most_per_class = max(np.bincount(np.concatenate([labels for _, labels in data]), minlength=classes))
    ceiling = math.sqrt((z * l2) ** 2 + most_per_class / 4) / scale
    # the sample std of 3,200 draws has a relative standard error of 1/sqrt(6400) = 1.25%: 4 of them either side
    assert 0.95 * intended < errors.std() < 1.05 * ceiling  # every site adding z x Delta would give sqrt 3 = 1.73 x
    assert abs(errors.mean()) < 5 * intended / math.sqrt(errors.size)
