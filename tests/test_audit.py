"""The one-run privacy audit: the bound against hand computations, and the auditor against known mechanisms.

The mechanism tests run the project's own DP-SGD trainer and class-sum release
on small synthetic features (seconds); the real MiniLM features are marked slow.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from simulations.audit import (
    AuditSettings,
    ProbeSettings,
    audit_class_sums,
    audit_head,
    class_sum_canaries,
    data_free_directions,
    head_canaries,
    head_scores,
    main,
    synthetic_features,
)
from simulations.audit_bound import (
    audit_p_value,
    audit_scores,
    epsilon_lower_bound,
    guess_counts,
    guess_membership,
)

# A short probe keeps the mechanism tests at a few seconds each; the canaries' signal and the
# calibrated noise both scale with the steps, so the audit's verdicts are the same as with 20 x 40.
SHORT_PROBE = ProbeSettings(rounds=4, steps=25, batch_size=128, learning_rate=0.25)


def binomial_tail(r: int, v: int, q: float) -> float:
    """P[Binomial(r, q) >= v], by hand."""
    return sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1))


# --- the bound ---------------------------------------------------------------------------------


def test_p_value_is_the_binomial_tail_when_delta_is_zero() -> None:
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert audit_p_value(50, 20, 15, 1.0, 0.0) == pytest.approx(binomial_tail(20, 15, q), rel=1e-10)
    assert audit_p_value(10, 10, 0, 3.0, 0.0) == 1.0  # at least 0 right: certain


def test_p_value_delta_term_by_hand() -> None:
    m, r, v, eps, delta = 40, 6, 5, 0.5, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    worst = max(sum(pmf[v - i : v]) / i for i in range(1, v + 1))  # max_i P[v-i <= Q < v] / i
    expected = binomial_tail(r, v, q) + 2 * m * delta * worst
    assert audit_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-10)
    assert audit_p_value(m, r, v, eps, delta) > audit_p_value(m, r, v, eps, 0.0)


def test_all_guesses_right_gives_the_closed_form() -> None:
    # v = r: the p-value is q^r, so the bound solves q^r = beta: q = beta^(1/r), eps = log(q / (1 - q)).
    for r in (10, 100, 500):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    q = 0.05 ** (1 / 100)  # 3.493: what 100 perfect guesses can prove, at most
    assert math.log(q / (1 - q)) == pytest.approx(3.493, abs=1e-3)


def test_the_bound_never_passes_its_crossing() -> None:
    bound = epsilon_lower_bound(1000, 200, 170, 1e-5, 0.05)
    assert audit_p_value(1000, 200, 170, bound, 1e-5) < 0.05 <= audit_p_value(1000, 200, 170, bound + 1e-4, 1e-5)


def test_delta_only_lowers_the_bound() -> None:
    assert epsilon_lower_bound(1000, 100, 100, 1e-5) < epsilon_lower_bound(1000, 100, 100, 0.0)
    assert epsilon_lower_bound(1000, 100, 100, 1e-5) > 3.4


def test_chance_guesses_give_zero() -> None:
    for r in (10, 100, 1000):
        assert epsilon_lower_bound(1000, r, r // 2, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 40, 1e-5) == 0.0  # worse than chance
    assert epsilon_lower_bound(10, 0, 0, 1e-5) == 0.0  # no guesses


def test_the_bound_grows_with_correct_guesses() -> None:
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(100, 201, 10)]
    assert bounds[0] == 0.0 and bounds[-1] > 3.0
    assert all(later > earlier for earlier, later in zip(bounds[2:], bounds[3:]))
    assert all(later >= earlier for earlier, later in zip(bounds, bounds[1:]))


def test_bound_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="v <= guesses r"):
        epsilon_lower_bound(10, 5, 6, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        audit_p_value(10, 5, 3, 1.0, -1.0)
    with pytest.raises(ValueError, match="beta"):
        epsilon_lower_bound(10, 5, 3, 1e-5, beta=1.5)


def test_guesses_take_the_extremes() -> None:
    scores = np.array([5.0, -3.0, 0.1, 4.0, -2.0, 0.0])
    included = np.array([True, False, False, False, False, True])
    guess = guess_membership(scores, included, k_plus=2, k_minus=2)
    # in: indices 0 (right) and 3 (wrong); out: indices 1 and 4 (both right)
    assert (guess.guesses, guess.correct) == (4, 3)
    with pytest.raises(ValueError, match="add up to at most 6"):
        guess_membership(scores, included, 4, 3)


def test_guess_sets_are_bonferroni_corrected() -> None:
    assert guess_counts(100) == [(2, 2), (5, 5), (10, 10), (20, 20), (40, 40)]
    assert guess_counts(100, (1.0,)) == [(50, 50)]
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    perfect = audit_scores(included.astype(float), included, 1e-5)
    # 183 of 400 are in: 160 each way is all right, the largest set tried
    assert perfect.tests == 5 and perfect.correct == perfect.guesses == 320
    assert perfect.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(400, 320, 320, 1e-5, 0.05 / 5))
    lopsided = audit_scores(included.astype(float), included, 1e-5, fractions=(1.0,))  # 200 "in" hold 17 outs
    assert lopsided.correct == 400 - (200 - 183) and lopsided.tests == 1
    noise = audit_scores(rng.normal(size=400), included, 1e-5)
    assert noise.epsilon_lower_bound < 0.5


# --- canaries -----------------------------------------------------------------------------------


def test_head_canaries_avoid_the_data_and_each_other() -> None:
    site = synthetic_features(seed=1)
    free = data_free_directions(site.features)
    assert np.allclose(free @ free.T, np.eye(len(free)), atol=1e-8)
    energy = np.square(site.features.astype(np.float64) @ free.T).sum() / np.square(site.features).sum()
    assert energy <= 0.1
    canaries = head_canaries(site, 2 * len(free), seed=0)
    assert np.allclose(np.linalg.norm(canaries.features, axis=1), 1.0, atol=1e-6)
    for direction in np.unique(canaries.features.round(5), axis=0):  # canaries sharing a direction differ in label
        same = np.all(np.isclose(canaries.features, direction, atol=1e-4), axis=1)
        assert len(set(canaries.labels[same])) == same.sum()
    with pytest.raises(ValueError, match="data-free directions"):
        head_canaries(site, 2 * len(free) + 1, seed=0)


def test_head_score_is_the_movement_toward_the_canary() -> None:
    site = synthetic_features(seed=0)
    canaries = head_canaries(site, 2, seed=0)
    moved = np.zeros((site.num_classes, site.dim))
    moved[canaries.labels[0]] += 2.0 * canaries.features[0]  # the head moved toward canary 0 only
    scores = head_scores(moved, canaries)
    assert scores[0] == pytest.approx(2.0, abs=1e-6)


def test_class_sum_canaries_are_orthonormal_within_a_class() -> None:
    site = synthetic_features(seed=0)
    canaries = class_sum_canaries(site, 3 * site.num_classes, seed=0)
    for label in range(site.num_classes):
        rows = canaries.features[canaries.labels == label].astype(np.float64)
        assert np.allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-6)
    assert 0 < canaries.included.sum() < len(canaries)


# --- the auditor on known mechanisms ------------------------------------------------------------


@pytest.fixture(scope="module")
def site():
    return synthetic_features(seed=0)


def test_non_private_head_gives_a_clearly_positive_bound(site) -> None:
    report = audit_head(site, SHORT_PROBE, AuditSettings(private=False))
    assert report.ledger_epsilon is None
    assert report.epsilon_lower_bound > 2.0


def test_non_private_class_sums_give_a_clearly_positive_bound(site) -> None:
    report = audit_class_sums(site, AuditSettings(private=False))
    assert report.mean_score_in == pytest.approx(1.0) and report.mean_score_out == pytest.approx(0.0, abs=1e-6)
    assert report.correct == report.guesses  # no noise: no wrong guess
    assert report.epsilon_lower_bound > 3.5  # 256 perfect guesses of 320 at beta / 5


@pytest.mark.parametrize("mechanism", ["head", "class-sums"])
def test_broken_noise_is_caught_at_epsilon_one(site, mechanism: str) -> None:
    settings = AuditSettings(target_epsilon=1.0, break_noise=True)
    report = audit_head(site, SHORT_PROBE, settings) if mechanism == "head" else audit_class_sums(site, settings)
    assert report.noise_multiplier_used == 0.0 and report.noise_multiplier_calibrated > 1.0
    assert report.ledger_epsilon <= 1.0 + 1e-6
    assert report.epsilon_lower_bound > report.ledger_epsilon


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
@pytest.mark.parametrize("mechanism", ["head", "class-sums"])
def test_private_mechanisms_stay_under_their_ledger(site, mechanism: str, epsilon: float) -> None:
    settings = AuditSettings(target_epsilon=epsilon)
    report = audit_head(site, SHORT_PROBE, settings) if mechanism == "head" else audit_class_sums(site, settings)
    assert report.ledger_epsilon == pytest.approx(epsilon, rel=0.02)
    assert report.noise_multiplier_used == report.noise_multiplier_calibrated > 0
    assert report.epsilon_lower_bound <= report.ledger_epsilon


def test_settings_refuse_a_broken_control() -> None:
    with pytest.raises(ValueError, match="--dp"):
        AuditSettings(private=False, break_noise=True)


def test_command_line_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "audit.json"
    assert (
        main(
            [
                "--mechanism",
                "class-sums",
                "--features",
                "synthetic",
                "--target-epsilon",
                "1",
                "--break-noise",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "eps lower bound" in printed and "noise off" in printed
    report = json.loads(out.read_text())
    assert report["mechanism"] == "class-sums" and report["epsilon_lower_bound"] > report["ledger_epsilon"]


def test_command_line_reports_bad_input(capsys) -> None:
    assert main(["--mechanism", "head", "--canaries", "100000"]) == 2
    assert "use 1 .." in capsys.readouterr().err


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--mechanism",
        "--canaries",
        "--target-epsilon",
        "--delta",
        "--seed",
        "--no-dp",
        "--break-noise",
        "--features",
        "--output",
    ):
        assert option in text


@pytest.mark.slow
def test_real_features_broken_noise_is_caught() -> None:
    from simulations.audit import default_site_features

    real, _ = default_site_features()
    report = audit_class_sums(real, AuditSettings(target_epsilon=1.0, break_noise=True))
    assert report.epsilon_lower_bound > 1.0
