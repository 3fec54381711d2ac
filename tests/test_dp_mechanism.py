"""DP-SGD runs exactly the mechanism that was priced: noise scale, clipping, divisor, sampling rate, empty pools.

Each test measures what the trainer did against an independent reference (a
one-example-at-a-time autograd loop, the binomial law of Poisson batch sizes,
the Gaussian's moments) and fails if the mechanism silently drops its noise,
skips per-sample clipping, divides by the wrong count or samples at another
rate than the one the ledger records. Tiny linear heads on random features:
no model, no download, a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client.dp_training import train_private_features
from client.mechanisms import SgdMechanism, sgd_mechanism
from client.secure_noise import SECURE_SCALE, SECURE_TERMS, NoiseSource

TOLERANCE = 5.0  # standard errors: a correct mechanism fails about once in 3.5 million runs per bound

DIM, CLASSES = 400, 50  # 20,050 parameters: one step gives a precise estimate of the noise's std


class RecordingHead(nn.Module):
    """A linear head that records, per call, the real rows it was fed and all rows it computed.

    Private steps pad their Poisson batch with all-zero dummy rows to a fixed
    size; the test features are random, so a non-zero row is a real record.
    """

    def __init__(self, dim: int, classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(dim, classes)
        self.batch_sizes: list[int] = []
        self.rows_computed: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(int((x.abs().sum(dim=1) > 0).sum()))
        self.rows_computed.append(int(x.shape[0]))
        return self.linear(x)


def flat_parameters(head: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in head.parameters()])


def big_gradient_records(records: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of norm ~100, so every per-example gradient norm is far above a clip of 1."""
    generator = torch.Generator().manual_seed(seed)
    features = 5.0 * torch.randn(records, DIM, generator=generator)
    return features, torch.randint(0, CLASSES, (records,), generator=generator)


def clipped_sum_by_loop(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, clip: float) -> torch.Tensor:
    """Reference: each example's gradient by autograd alone, clipped jointly to ``clip``, summed (flattened)."""
    params = list(head.parameters())
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    norms = []
    for i in range(len(labels)):
        grads = torch.autograd.grad(F.cross_entropy(head(features[i : i + 1]), labels[i : i + 1]), params)
        flat = torch.cat([g.reshape(-1) for g in grads]).double()
        norms.append(float(flat.norm()))
        total += flat * min(1.0, clip / (norms[-1] + 1e-6))  # Opacus' clip factor
    assert min(norms) > 20 * clip  # clipping matters for every example
    return total


def assert_std(sample: torch.Tensor, expected_std: float) -> None:
    """Mean 0 and std ``expected_std`` within TOLERANCE standard errors; Gaussian tails (beyond 2 std: 4.55%)."""
    n = sample.numel()
    sample = sample.double()
    mean, std = float(sample.mean()), float(sample.std())
    assert abs(mean) < TOLERANCE * expected_std / math.sqrt(n), (mean, expected_std)
    assert abs(std / expected_std - 1.0) < TOLERANCE / math.sqrt(2 * n), (std, expected_std)
    tail, p = float((sample.abs() > 2 * expected_std).double().mean()), 0.0455
    assert abs(tail - p) < TOLERANCE * math.sqrt(p * (1 - p) / n), tail


@pytest.mark.parametrize("noise", [NoiseSource.seeded(5), NoiseSource.secure()], ids=["seeded", "secure"])
def test_update_noise_has_std_sigma_c_over_expected_batch(noise: NoiseSource) -> None:
    """One SGD step (lr 1) at sample rate 1: update - clipped mean (by a loop) is the noise, std sigma*C/B."""
    sigma, clip, expected_batch = 1.3, 1.0, 24.0  # the divisor is the public constant, not the 16 records
    features, labels = big_gradient_records(16)
    head = RecordingHead(DIM, CLASSES)
    reference = clipped_sum_by_loop(head.linear, features, labels, clip)
    before = flat_parameters(head)
    outcome = train_private_features(
        head, features, labels, SgdMechanism(sigma, 1.0, 1, clip, expected_batch), 1.0, noise
    )
    assert outcome.steps == 1 and head.batch_sizes == [16]
    residual = (before - flat_parameters(head)).double() - reference / expected_batch
    assert_std(residual, sigma * clip / expected_batch)


def test_without_noise_the_update_is_the_loops_clipped_sum_over_the_expected_batch() -> None:
    """Sigma 0, clip 1, gradient norms ~100: SGD lr 1 moves the head by exactly sum(clipped) / expected_batch."""
    clip, expected_batch = 1.0, 40.0  # 16 records all drawn (rate 1), divided by the mechanism's 40
    features, labels = big_gradient_records(16, seed=2)
    head = RecordingHead(DIM, CLASSES)
    reference = clipped_sum_by_loop(head.linear, features, labels, clip)
    before = flat_parameters(head)
    train_private_features(
        head, features, labels, SgdMechanism(0.0, 1.0, 1, clip, expected_batch), 1.0, NoiseSource.seeded(0)
    )
    update = (before - flat_parameters(head)).double()
    torch.testing.assert_close(update, reference / expected_batch, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("records", [200, 80, 0], ids=["nominal", "fewer-than-nominal", "none"])
def test_poisson_batches_have_mean_q_times_records_at_the_mechanisms_rate(records: int) -> None:
    """400 steps at q = 10/200: the batches the head sees are Binomial(records, q), whatever the records passed."""
    mechanism = sgd_mechanism(1.0, 10, 200, 400, 1.0)  # priced for 200 nominal records
    q = mechanism.sample_rate
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(records, 8, generator=generator)
    labels = torch.randint(0, 3, (records,), generator=generator)
    head = RecordingHead(8, 3)
    outcome = train_private_features(head, features, labels, mechanism, 0.01, NoiseSource.seeded(4))
    assert outcome.steps == mechanism.steps
    seen = head.batch_sizes + [0] * (mechanism.steps - len(head.batch_sizes))  # empty batches never reach the head
    sizes = torch.tensor(seen, dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(outcome.mean_batch_size)
    mean, variance = records * q, records * q * (1 - q)
    if records == 0:
        assert set(head.batch_sizes) == {0}  # dummy rows only
        return
    standard_error = math.sqrt(variance / mechanism.steps)
    assert abs(float(sizes.mean()) - mean) < TOLERANCE * standard_error, (float(sizes.mean()), mean)
    # Poisson, not fixed-size batches: the spread is binomial too (sample variance's SE ~ variance*sqrt(2/steps))
    assert abs(float(sizes.var()) / variance - 1.0) < TOLERANCE * math.sqrt(2 / mechanism.steps)


def test_zero_records_run_every_step_as_pure_noise_of_the_right_std() -> None:
    """No record at all: 3 steps still happen and move the head by noise alone, std sqrt(3)*sigma*C/B."""
    mechanism = sgd_mechanism(0.8, 8, 100, 3, 2.0)
    head = RecordingHead(DIM, CLASSES)
    before = flat_parameters(head)
    outcome = train_private_features(
        head, torch.zeros(0, DIM), torch.zeros(0, dtype=torch.long), mechanism, 1.0, NoiseSource.seeded(6)
    )
    assert outcome.steps == 3 and head.batch_sizes == [0, 0, 0]
    update = before - flat_parameters(head)
    assert_std(
        update, math.sqrt(3) * mechanism.noise_multiplier * mechanism.max_grad_norm / mechanism.expected_batch_size
    )


def test_secure_source_draws_standard_gaussians_and_two_sources_differ() -> None:
    first, second = NoiseSource.secure(), NoiseSource.secure()
    assert first.is_secure and not NoiseSource.seeded(0).is_secure
    sample = first.gaussian((200_000,), 1.0, dtype=torch.float64)
    assert_std(sample, 1.0)
    assert not torch.equal(first.gaussian((64,), 1.0), second.gaussian((64,), 1.0))
    assert_std(torch.from_numpy(second.gaussian_numpy((400, 500), 2.5)), 2.5)
    uniform = first.uniform(100_000)
    assert 0.0 <= float(uniform.min()) and float(uniform.max()) < 1.0
    assert abs(float(uniform.mean()) - 0.5) < TOLERANCE * math.sqrt(1 / 12 / 100_000)
    batch = first.poisson(100_000, 0.1)
    assert abs(len(batch) - 10_000) < TOLERANCE * math.sqrt(100_000 * 0.1 * 0.9)
    assert torch.equal(batch, torch.unique(batch)) and len(first.poisson(0, 0.5)) == 0


def test_seeded_sources_reproduce_and_noise_is_the_hardened_sum_of_four_draws() -> None:
    """Opacus secure_mode's construction: each coordinate is (z1 + z2 + z3 + z4) * std / 2."""
    assert torch.equal(NoiseSource.seeded(9).gaussian((50,), 1.0), NoiseSource.seeded(9).gaussian((50,), 1.0))
    assert not torch.equal(NoiseSource.seeded(9).gaussian((50,), 1.0), NoiseSource.seeded(10).gaussian((50,), 1.0))
    draws = NoiseSource.seeded(11)
    by_hand = sum(draws.standard_normal(30) for _ in range(SECURE_TERMS)) * (SECURE_SCALE * 3.0)
    torch.testing.assert_close(
        NoiseSource.seeded(11).gaussian((5, 6), 3.0, dtype=torch.float64), by_hand.reshape(5, 6), rtol=0, atol=1e-12
    )
    assert torch.equal(NoiseSource.seeded(1).gaussian((4,), 0.0), torch.zeros(4))
    with pytest.raises(ValueError, match="seed"):
        NoiseSource.seeded(-1)
    with pytest.raises(ValueError, match="std"):
        NoiseSource.seeded(1).gaussian((4,), -1.0)


def test_every_private_step_computes_the_same_number_of_rows_whatever_was_drawn() -> None:
    """Timing hides the draw: private batches are padded to the public fixed size; plain ones are not."""
    from client.dp_training import fixed_batch_size

    mechanism = sgd_mechanism(1.0, 10, 200, 60, 1.0)
    for records in (200, 30, 0):
        generator = torch.Generator().manual_seed(records)
        head = RecordingHead(8, 3)
        train_private_features(
            head,
            torch.randn(records, 8, generator=generator),
            torch.randint(0, 3, (records,), generator=generator),
            mechanism,
            0.01,
            NoiseSource.seeded(1),
        )
        assert set(head.rows_computed) == {fixed_batch_size(mechanism)}, records
    plain = sgd_mechanism(0.0, 10, 200, 60, 1e9)
    head = RecordingHead(8, 3)
    train_private_features(head, torch.randn(200, 8), torch.randint(0, 3, (200,)), plain, 0.01, NoiseSource.seeded(1))
    assert head.rows_computed == head.batch_sizes[: len(head.rows_computed)]  # no padding without DP
