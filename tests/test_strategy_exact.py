"""Exact aggregation against the weighted mean of B_i A_i computed here; FedAvg's error measured against it."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_helpers import HEAD_B, HEAD_W, lora_name, random_adapter, relative_error, weighted_sum

from strategies.aggregation import SiteUpdate
from strategies.exact import ExactAggregator, residual_name
from strategies.fedavg import FedAvgAggregator

COUNTS = [10, 20, 30]
LAYERS = [(layer, module) for layer in range(2) for module in ("query", "value")]


def _low_rank_sites(rng: np.random.Generator, rank: int = 4, out: int = 12, inp: int = 10) -> list[SiteUpdate]:
    """Sites whose factors all differ but whose products B_i A_i = P S_i T_i Q share one rank-r subspace."""
    updates = []
    bases = {key: (rng.standard_normal((out, rank)), rng.standard_normal((rank, inp))) for key in LAYERS}
    for i, count in enumerate(COUNTS):
        arrays = random_adapter(rng, out=out, inp=inp, rank=rank)
        for (layer, module), (p, q) in bases.items():
            arrays[lora_name(layer, module, "B")] = (p @ rng.standard_normal((rank, rank))).astype(np.float32)
            arrays[lora_name(layer, module, "A")] = (rng.standard_normal((rank, rank)) @ q).astype(np.float32)
        updates.append(SiteUpdate(f"site-{i}", arrays, count))
    return updates


def _reference_product(updates: list[SiteUpdate], layer: int, module: str) -> np.ndarray:
    products = [
        u.arrays[lora_name(layer, module, "B")].astype(np.float64)
        @ u.arrays[lora_name(layer, module, "A")].astype(np.float64)
        for u in updates
    ]
    return weighted_sum(products, [u.num_examples for u in updates])


def _product(arrays: dict, layer: int, module: str) -> np.ndarray:
    return arrays[lora_name(layer, module, "B")].astype(np.float64) @ arrays[lora_name(layer, module, "A")]


@pytest.mark.parametrize("residual", ["carry", "drop"])
def test_exact_reproduces_the_weighted_mean_of_products_when_the_rank_allows(residual: str) -> None:
    updates = _low_rank_sites(np.random.default_rng(0))
    result = ExactAggregator(residual=residual).aggregate({}, updates)
    for layer, module in LAYERS:
        assert relative_error(_product(result, layer, module), _reference_product(updates, layer, module)) < 1e-5
        assert result[lora_name(layer, module, "A")].shape == (4, 10)
        assert result[lora_name(layer, module, "B")].shape == (12, 4)
    for name in (HEAD_W, HEAD_B):
        np.testing.assert_allclose(result[name], weighted_sum([u.arrays[name] for u in updates], COUNTS), rtol=1e-6)


def test_fedavg_is_measurably_off_the_mean_of_products_for_non_iid_factors() -> None:
    updates = _low_rank_sites(np.random.default_rng(1))
    fedavg = FedAvgAggregator().aggregate({}, updates)
    errors = [
        relative_error(_product(fedavg, layer, module), _reference_product(updates, layer, module))
        for layer, module in LAYERS
    ]
    print(f"fedavg relative error against mean(B_i A_i): {np.round(errors, 3)}")  # about 0.5-1 here
    assert min(errors) > 0.05


def test_exact_is_the_best_rank_r_approximation_when_the_rank_does_not_allow() -> None:
    rng = np.random.default_rng(2)
    updates = [SiteUpdate(f"site-{i}", random_adapter(rng), count) for i, count in enumerate(COUNTS)]
    exact = ExactAggregator(residual="drop")
    result = exact.aggregate({}, updates)
    for layer, module in LAYERS:
        reference = _reference_product(updates, layer, module)
        tail = np.linalg.svd(reference, compute_uv=False)[4:]
        error = np.linalg.norm(_product(result, layer, module) - reference)
        assert error == pytest.approx(np.sqrt(np.sum(tail**2)), rel=1e-5)
        assert exact.last_residual_norms[residual_name(lora_name(layer, module, "A"))] == pytest.approx(error, rel=1e-5)
    assert 0 < exact.last_relative_residual < 1
    assert exact.residuals == {}


def test_carried_residual_is_added_to_the_next_rounds_target() -> None:
    rng = np.random.default_rng(3)
    exact = ExactAggregator(residual="carry")
    first = [SiteUpdate(f"site-{i}", random_adapter(rng), c) for i, c in enumerate(COUNTS)]
    exact.aggregate({}, first)
    carried = {key: value.copy() for key, value in exact.residuals.items()}
    second = [SiteUpdate(f"site-{i}", random_adapter(rng), c) for i, c in enumerate(COUNTS)]
    result = exact.aggregate({}, second)
    for layer, module in LAYERS:
        key = residual_name(lora_name(layer, module, "A"))
        target = _reference_product(second, layer, module) + carried[key]
        assert relative_error(_product(result, layer, module) + exact.residuals[key], target) < 1e-6
        tail = np.linalg.svd(target, compute_uv=False)[4:]
        assert np.linalg.norm(exact.residuals[key]) == pytest.approx(np.sqrt(np.sum(tail**2)), rel=1e-5)


def test_residual_survives_a_checkpoint() -> None:
    rng = np.random.default_rng(4)
    exact = ExactAggregator()
    exact.aggregate({}, [SiteUpdate(f"site-{i}", random_adapter(rng), c) for i, c in enumerate(COUNTS)])
    restored = ExactAggregator()
    restored.load_state_dict(exact.state_dict())
    assert restored.residuals.keys() == exact.residuals.keys()
    for key, value in exact.residuals.items():
        np.testing.assert_array_equal(restored.residuals[key], value)


def test_exact_rejects_unpaired_or_mismatched_factors() -> None:
    arrays = random_adapter(np.random.default_rng(5))
    lonely = {k: v for k, v in arrays.items() if k != lora_name(0, "query", "B")}
    with pytest.raises(ValueError, match="partner"):
        ExactAggregator().aggregate({}, [SiteUpdate("a", lonely, 1)])
    arrays[lora_name(0, "query", "A")] = np.zeros((3, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="rank"):
        ExactAggregator().aggregate({}, [SiteUpdate("a", arrays, 1)])
    with pytest.raises(ValueError, match="residual mode"):
        ExactAggregator(residual="keep")


def test_zero_products_keep_the_shared_factors_as_fedavg_would() -> None:
    """The linear-probe phase: every B_i is zero, so the factors must pass through (zero A would freeze LoRA)."""
    rng = np.random.default_rng(5)
    base = random_adapter(rng)
    for layer, module in LAYERS:
        base[lora_name(layer, module, "B")][:] = 0.0
    updates = [SiteUpdate(f"site-{i}", {**base, HEAD_W: base[HEAD_W] + i}, c) for i, c in enumerate(COUNTS)]
    result = ExactAggregator().aggregate({}, updates)
    for layer, module in LAYERS:
        np.testing.assert_array_equal(result[lora_name(layer, module, "A")], base[lora_name(layer, module, "A")])
        assert not np.any(result[lora_name(layer, module, "B")])


def test_a_keeps_the_sites_scale_and_rank_deficient_components_stay_trainable() -> None:
    rng = np.random.default_rng(6)
    rank, out, inp = 4, 12, 10
    updates = []
    for i, count in enumerate(COUNTS):
        arrays = random_adapter(rng, rank=rank, out=out, inp=inp)
        for layer, module in LAYERS:  # every product has rank 1 in one shared direction: M has rank 1 < r
            b = np.zeros((out, rank), np.float32)
            b[:, 0] = rng.standard_normal(out)
            arrays[lora_name(layer, module, "B")] = b
            arrays[lora_name(layer, module, "A")][0] = np.linspace(1, 2, inp) * (i + 1)
        updates.append(SiteUpdate(f"site-{i}", arrays, count))
    result = ExactAggregator().aggregate({}, updates)
    for layer, module in LAYERS:
        a = result[lora_name(layer, module, "A")].astype(np.float64)
        a_mean = weighted_sum([u.arrays[lora_name(layer, module, "A")] for u in updates], COUNTS)
        target = np.sqrt(np.mean(np.sum(a_mean**2, axis=1)))
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), target, rtol=1e-5)  # every row, dead ones too
        assert relative_error(_product(result, layer, module), _reference_product(updates, layer, module)) < 1e-5
        assert not np.any(result[lora_name(layer, module, "B")][:, 1:])  # dead components: B column zero
