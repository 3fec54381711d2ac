"""FFA-LoRA: with one shared A, averaging B is exactly the weighted mean of B_i A."""

from __future__ import annotations

import numpy as np
from strategy_helpers import HEAD_B, HEAD_W, lora_name, random_adapter, relative_error, weighted_sum

from strategies.aggregation import SiteUpdate
from strategies.ffa import FFAAggregator, ffa_frozen_names, ffa_trainable_names

COUNTS = [5, 15, 40]
LAYERS = [(layer, module) for layer in range(2) for module in ("query", "value")]


def _sites(rng: np.random.Generator, shared: dict, send_a: bool) -> list[SiteUpdate]:
    updates = []
    for i, count in enumerate(COUNTS):
        arrays = random_adapter(rng)
        if send_a:
            arrays.update(shared)
        else:
            arrays = {n: arrays[n] for n in ffa_trainable_names(arrays)}
        updates.append(SiteUpdate(f"site-{i}", arrays, count))
    return updates


def test_ffa_aggregation_is_exact_with_a_shared_a() -> None:
    rng = np.random.default_rng(0)
    current = random_adapter(rng)
    shared = {n: current[n] for n in ffa_frozen_names(current)}
    updates = _sites(rng, shared, send_a=False)
    result = FFAAggregator().aggregate(current, updates)
    for layer, module in LAYERS:
        a, b = lora_name(layer, module, "A"), lora_name(layer, module, "B")
        np.testing.assert_array_equal(result[a], current[a])
        reference = weighted_sum([u.arrays[b].astype(np.float64) @ shared[a] for u in updates], COUNTS)
        assert relative_error(result[b].astype(np.float64) @ result[a], reference) < 1e-6
    np.testing.assert_allclose(result[HEAD_W], weighted_sum([u.arrays[HEAD_W] for u in updates], COUNTS), rtol=1e-6)
    assert set(result) == set(current)


def test_round_one_takes_a_from_the_first_update_that_carries_it() -> None:
    rng = np.random.default_rng(1)
    shared = {n: v for n, v in random_adapter(rng).items() if "lora_A" in n}
    updates = _sites(rng, shared, send_a=True)
    ffa = FFAAggregator()
    result = ffa.aggregate({}, updates)
    for name, value in shared.items():
        np.testing.assert_array_equal(result[name], value)
    assert ffa.last_a_deviation == 0.0


def test_a_trained_by_a_site_is_ignored_and_reported() -> None:
    rng = np.random.default_rng(2)
    current = random_adapter(rng)
    shared = {n: current[n] for n in ffa_frozen_names(current)}
    updates = _sites(rng, shared, send_a=True)
    drifted = dict(updates[1].arrays)
    name = lora_name(0, "value", "A")
    drifted[name] = drifted[name] + np.float32(0.25)
    updates[1] = SiteUpdate("site-1", drifted, COUNTS[1])
    ffa = FFAAggregator()
    result = ffa.aggregate(current, updates)
    np.testing.assert_array_equal(result[name], current[name])
    assert abs(ffa.last_a_deviation - 0.25) < 1e-6


def test_without_any_a_the_result_has_none_and_sites_keep_their_seeded_a() -> None:
    updates = _sites(np.random.default_rng(3), {}, send_a=False)
    result = FFAAggregator().aggregate({}, updates)
    assert ffa_frozen_names(result) == []
    assert set(result) == set(updates[0].arrays)
    np.testing.assert_allclose(result[HEAD_B], weighted_sum([u.arrays[HEAD_B] for u in updates], COUNTS), rtol=1e-6)


def test_name_helpers_split_peft_names() -> None:
    names = list(random_adapter(np.random.default_rng(4)))
    assert ffa_frozen_names(names) == sorted(lora_name(layer, m, "A") for layer, m in LAYERS)
    assert ffa_trainable_names(names) == sorted([lora_name(layer, m, "B") for layer, m in LAYERS] + [HEAD_W, HEAD_B])
    assert FFAAggregator().uploaded_names(names) == ffa_trainable_names(names)
