"""EWC: penalty gradient by hand on trainable parameters only, online decay, persistence, private importances
against a one-example loop, noise scale, the ledger's extra epsilon, and the update moving under Opacus."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

from client.ewc import EWC_FILE, EwcState, anchor_arrays, estimate_importance, trainable_parameters
from client.mechanisms import UNBOUNDED_CLIP, SgdMechanism
from client.secure_noise import NoiseSource
from fedcl.run_config import ConfigError


def small_model(seed: int = 0) -> nn.Module:
    """Two linear layers, the first frozen (a stand-in for the base model)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def random_term(model: nn.Module, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    importance = {k: rng.uniform(0.0, 2.0, s).astype(np.float32) for k, s in shapes.items()}
    anchor = {k: rng.normal(0.0, 1.0, s).astype(np.float32) for k, s in shapes.items()}
    return importance, anchor


def current(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def test_penalty_gradient_is_lambda_f_theta_minus_anchor_on_trainable_parameters_only():
    model = small_model()
    importance, anchor = random_term(model, 1)
    state = EwcState("separate")
    state.consolidate(0, importance, anchor)
    gradient = state.penalty_gradient(model, ewc_lambda=3.0)
    assert set(gradient) == {"2.weight", "2.bias"}  # the frozen layer never appears
    theta = current(model)
    for name in gradient:
        by_hand = 3.0 * importance[name] * (theta[name] - anchor[name])
        np.testing.assert_allclose(gradient[name].numpy(), by_hand, rtol=1e-6, atol=1e-7)
    penalty_by_hand = 1.5 * sum(float(np.sum(importance[k] * (theta[k] - anchor[k]) ** 2)) for k in importance)
    assert state.penalty(model, 3.0) == pytest.approx(penalty_by_hand, rel=1e-5)
    assert EwcState("separate").penalty_gradient(model, 3.0) == {}
    assert state.penalty_gradient(model, 0.0) == {}


def test_separate_mode_sums_one_penalty_per_experience():
    model = small_model()
    (f1, a1), (f2, a2) = random_term(model, 1), random_term(model, 2)
    state = EwcState("separate")
    state.consolidate(0, f1, a1)
    state.consolidate(1, f2, a2)
    theta = current(model)
    gradient = state.penalty_gradient(model, 2.0)
    for name in gradient:
        by_hand = 2.0 * (f1[name] * (theta[name] - a1[name]) + f2[name] * (theta[name] - a2[name]))
        np.testing.assert_allclose(gradient[name].numpy(), by_hand, rtol=1e-5, atol=1e-6)


def test_online_mode_decays_old_importances_and_keeps_the_newest_anchor():
    model = small_model()
    (f1, a1), (f2, a2), (f3, a3) = random_term(model, 1), random_term(model, 2), random_term(model, 3)
    state = EwcState("online", decay=0.5)
    for e, (f, a) in enumerate([(f1, a1), (f2, a2), (f3, a3)]):
        state.consolidate(e, f, a)
    assert len(state.importances) == 1
    theta = current(model)
    gradient = state.penalty_gradient(model, 1.0)
    for name in gradient:
        decayed = 0.5 * (0.5 * f1[name] + f2[name]) + f3[name]
        np.testing.assert_allclose(state.importances[0][name], decayed, rtol=1e-6)
        np.testing.assert_allclose(gradient[name].numpy(), decayed * (theta[name] - a3[name]), rtol=1e-5, atol=1e-6)
    assert not state.consolidate(2, f1, a1)  # an experience is consolidated once


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_survives_save_and_load(mode, tmp_path):
    model = small_model()
    state = EwcState(mode, decay=0.9)
    state.consolidate(0, *random_term(model, 1))
    state.consolidate(1, *random_term(model, 2))
    state.save(tmp_path)
    loaded = EwcState.load(tmp_path, mode, 0.9)
    assert loaded.experiences == [0, 1]
    expected, got = state.penalty_gradient(model, 2.0), loaded.penalty_gradient(model, 2.0)
    assert all(torch.equal(expected[k], got[k]) for k in expected) and expected.keys() == got.keys()
    assert [p.name for p in tmp_path.iterdir()] == [EWC_FILE]
    with pytest.raises(ValueError, match="restore those settings or delete the file"):
        EwcState.load(tmp_path, "online" if mode == "separate" else "separate", 0.9)
    assert EwcState.load(tmp_path / "empty", mode, 0.9).experiences == []


def test_a_frozen_or_foreign_parameter_in_the_state_is_refused():
    model = small_model()
    importance, anchor = random_term(model, 1)
    importance["0.weight"], anchor["0.weight"] = np.ones((4, 3), np.float32), np.zeros((4, 3), np.float32)
    state = EwcState("separate")
    state.consolidate(0, importance, anchor)
    with pytest.raises(ValueError, match="not trainable parameters"):
        state.penalty_gradient(model, 1.0)
    with pytest.raises(ConfigError, match="ewc-decay"):
        EwcState("online", decay=1.5)
    with pytest.raises(ConfigError, match="ewc-mode"):
        EwcState("sum")
    bad = {k: -v for k, v in random_term(model, 2)[0].items()}
    with pytest.raises(ValueError, match="must be >= 0"):
        EwcState().consolidate(1, bad, random_term(model, 2)[1])


def test_names_are_those_of_the_plain_model_even_through_opacus_wrapping():
    from opacus import GradSampleModule

    model = small_model()
    state = EwcState()
    state.consolidate(0, *random_term(model, 1))
    wrapped = GradSampleModule(model)
    try:
        assert set(state.penalty_gradient(wrapped, 1.0)) == {"2.weight", "2.bias"}
        with pytest.raises(ValueError, match="plain model"):
            estimate_importance(wrapped, [], SgdMechanism(1.0, 0.1, 1, 1.0, 1.0), NoiseSource.seeded(0))
    finally:
        wrapped.to_standard_module()


def loop_importance(model: nn.Module, batches, clip: float | None, expected: float) -> dict[str, np.ndarray]:
    """Reference: one example at a time, autograd, clip by hand, square, sum, divide by the expected count."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    totals = {n: np.zeros(tuple(p.shape)) for n, p in params.items()}
    model.eval()
    for inputs, labels in batches:
        for i in range(len(labels)):
            model.zero_grad()
            one = {k: v[i : i + 1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[i : i + 1]
            out = model(**one) if isinstance(one, dict) else model(one)
            logits = getattr(out, "logits", out)
            nn.functional.cross_entropy(logits, labels[i : i + 1], reduction="sum").backward()
            grads = {n: p.grad.detach().double().numpy() for n, p in params.items()}
            norm = np.sqrt(sum(float(np.sum(g**2)) for g in grads.values()))
            factor = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))
            for n, g in grads.items():
                totals[n] += (g * factor) ** 2
    model.zero_grad()
    return {n: t / expected for n, t in totals.items()}


def tiny_lora_bert(folder) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(folder)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with torch.no_grad():  # move LoRA B off zero so A gets gradients too
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("clip", [None, 0.05])
def test_importance_matches_a_one_example_loop_on_a_lora_bert(tiny_model_dir, clip):
    """Guards against silently wrong per-sample gradients for LoRA layers (opacus issue 820)."""
    model = tiny_lora_bert(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for size in (5, 0, 3):  # a Poisson sampler can yield an empty batch
        ids = torch.randint(1000, 5000, (size, 10), generator=generator)
        batches.append(
            (
                {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                torch.randint(0, 5, (size,), generator=generator),
            )
        )
    model.train()
    mechanism = SgdMechanism(0.0, 0.4, 3, UNBOUNDED_CLIP if clip is None else clip, 0.4 * 10)
    estimate = estimate_importance(model, batches, mechanism, NoiseSource.seeded(0))
    assert all(module.training for module in model.modules())  # every module's mode restored
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus hooks and attributes gone
    reference = loop_importance(model, batches, clip, expected=0.4 * 10 * 3)
    assert set(estimate.importance) == set(trainable_parameters(model))
    assert all("lora_" in n or "classifier" in n for n in estimate.importance)
    for name, value in reference.items():
        np.testing.assert_allclose(estimate.importance[name], value, rtol=1e-4, atol=1e-9 * np.abs(value).max())
    assert estimate.ledger_steps == (0.0, 0.4, 3)  # the empty batch is a step too


def test_padding_rows_of_a_private_estimate_add_nothing(tiny_model_dir):
    """Under DP every batch is padded to a fixed size (timing); with negligible noise it still equals the loop."""
    model = tiny_lora_bert(tiny_model_dir)
    generator = torch.Generator().manual_seed(2)
    batches = []
    for size in (5, 0, 3):
        ids = torch.randint(1000, 5000, (size, 10), generator=generator)
        batches.append(
            (
                {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                torch.randint(0, 5, (size,), generator=generator),
            )
        )
    model.train()
    mechanism = SgdMechanism(1e-20, 0.4, 3, 0.05, 0.4 * 10)  # private (so padded), noise far below the values
    estimate = estimate_importance(model, batches, mechanism, NoiseSource.seeded(0))
    reference = loop_importance(model, batches, 0.05, expected=0.4 * 10 * 3)
    for name, value in reference.items():
        np.testing.assert_allclose(estimate.importance[name], value, rtol=1e-4, atol=1e-9 * np.abs(value).max())


def test_importance_noise_has_the_calibrated_scale():
    torch.manual_seed(0)
    model = nn.Linear(50, 4, bias=False)
    x, y = 10 * torch.randn(40, 50), torch.randint(0, 4, (40,))
    batches = [(x, y)] * 5
    reference = loop_importance(model, batches, 1.0, expected=1.0 * 40 * 5)["weight"]
    estimate = estimate_importance(model, batches, SgdMechanism(0.02, 1.0, 5, 1.0, 40.0), NoiseSource.seeded(3))
    assert estimate.noise_std == pytest.approx(0.02 * np.sqrt(5) / 200)
    assert estimate.ledger_steps == (0.02, 1.0, 5)
    clear = reference > 6 * estimate.noise_std  # away from the clamp at 0
    assert clear.sum() >= 100
    residual = estimate.importance["weight"][clear] - reference[clear]
    assert np.std(residual) == pytest.approx(estimate.noise_std, rel=0.25)
    assert abs(np.mean(residual)) < 4 * estimate.noise_std / np.sqrt(clear.sum())


def test_importances_cost_extra_epsilon_at_the_same_training_schedule():
    """Same DP-SGD schedule; the importance pass adds its Gaussian steps on the same records.

    Both are subsampled Gaussian mechanisms on the site's records, so the
    accountant composes them: epsilon with importances is strictly larger. The
    penalty gradient itself is post-processing of released values and adds no
    step, so EWC without a private importance pass (lambda only) costs nothing.
    """
    from opacus.accountants import create_accountant

    model = small_model()
    x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    estimate = estimate_importance(
        model, [(x[:8], y[:8]), (x[8:14], y[8:14])], SgdMechanism(3.0, 0.1, 2, 1.0, 6.4), NoiseSource.seeded(0)
    )
    training = [(1.0, 0.1, 200)]  # noise multiplier, sample rate, steps
    for mechanism in ("prv", "rdp"):
        without, with_importance = create_accountant(mechanism), create_accountant(mechanism)
        without.history = list(training)
        with_importance.history = training + [tuple(estimate.ledger_steps)]
        eps_without, eps_with = without.get_epsilon(1e-5), with_importance.get_epsilon(1e-5)
        assert eps_with > eps_without
        only_importance = create_accountant(mechanism)
        only_importance.history = [tuple(estimate.ledger_steps)]
        assert eps_with < eps_without + only_importance.get_epsilon(1e-5)  # tighter than adding epsilons


def dp_sgd_run(ewc_lambda: float, state: EwcState, anchor: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The project's DP-SGD (Poisson batches, clip, noise) on a head; the EWC gradient enters after the noise."""
    from client.dp_training import train_private_features

    head = nn.Linear(8, 3)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(anchor["weight"]))
        head.bias.copy_(torch.from_numpy(anchor["bias"]))
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(128, 8, generator=generator), torch.randint(0, 3, (128,), generator=generator)
    train_private_features(
        head,
        features,
        labels,
        SgdMechanism(1.0, 16 / 128, 20, 1.0, 16.0),
        0.5,
        NoiseSource.seeded(7),
        extra_gradient=functools.partial(state.penalty_gradient, ewc_lambda=ewc_lambda),
    )
    return anchor_arrays(head)


def test_under_dp_sgd_the_penalty_gradient_changes_the_update_and_holds_the_anchor():
    torch.manual_seed(0)
    anchor = anchor_arrays(nn.Linear(8, 3))
    state = EwcState()
    state.consolidate(0, {k: np.ones_like(v) for k, v in anchor.items()}, copy.deepcopy(anchor))
    free, held = dp_sgd_run(0.0, state, anchor), dp_sgd_run(1.0, state, anchor)
    again = dp_sgd_run(0.0, state, anchor)
    assert all(np.array_equal(free[k], again[k]) for k in anchor)  # same seed, same noise: only lambda differs
    distance = {
        name: sum(float(np.sum((run[k] - anchor[k]) ** 2)) for k in anchor)
        for name, run in (("free", free), ("held", held))
    }
    assert any(not np.array_equal(free[k], held[k]) for k in anchor)
    assert distance["held"] < 0.5 * distance["free"]


def test_importance_needs_exactly_the_mechanisms_batches_and_divides_by_its_expected_size():
    """Fewer or more batches than mechanism.steps is refused; the divisor is the public expected batch x steps."""
    model = small_model()
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    batch = (x[:6], y[:6])
    for count in (1, 3):
        with pytest.raises(ValueError, match="exactly mechanism.steps"):
            estimate_importance(model, [batch] * count, SgdMechanism(0.0, 0.5, 2, 1.0, 6.0), NoiseSource.seeded(0))
    with pytest.raises(ValueError, match="0 steps"):
        estimate_importance(model, [], SgdMechanism(0.0, 0.5, 0, 1.0, 6.0), NoiseSource.seeded(0))
    one = estimate_importance(model, [batch] * 2, SgdMechanism(0.0, 0.5, 2, 1.0, 6.0), NoiseSource.seeded(0))
    half = estimate_importance(model, [batch] * 2, SgdMechanism(0.0, 0.5, 2, 1.0, 12.0), NoiseSource.seeded(0))
    for name, value in one.importance.items():
        np.testing.assert_allclose(half.importance[name], value / 2, rtol=1e-6)
    assert one.ledger_steps == (0.0, 0.5, 2)
