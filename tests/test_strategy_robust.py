"""The validating wrapper: bad replies dropped with a reason, the round goes on, the result is the good replies'."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_helpers import HEAD_B, lora_name, random_adapter, weighted_sum

from strategies.aggregation import SiteUpdate
from strategies.fedavg import FedAvgAggregator
from strategies.ffa import FFAAggregator, ffa_trainable_names
from strategies.robust import RobustAggregator

SITES = [f"site-{i}" for i in range(5)]
COUNTS = [10, 20, 30, 40, 50]


def _good(rng: np.random.Generator, current: dict, spread: float = 0.1) -> list[SiteUpdate]:
    return [
        SiteUpdate(
            site, {n: (v + spread * rng.standard_normal(v.shape)).astype(np.float32) for n, v in current.items()}, count
        )
        for site, count in zip(SITES, COUNTS)
    ]


def _bad(current: dict, good: SiteUpdate) -> list[SiteUpdate]:
    """One reply for each way a reply can be wrong, named after its fault."""
    nan = dict(good.arrays)
    nan[HEAD_B] = nan[HEAD_B].copy()
    nan[HEAD_B][0] = np.nan
    shape = dict(good.arrays)
    shape[lora_name(0, "query", "A")] = np.zeros((5, 10), dtype=np.float32)
    missing = {n: v for n, v in good.arrays.items() if n != lora_name(1, "value", "B")}
    scaled = {n: (current[n] + 1e6 * (v - current[n])).astype(np.float32) for n, v in good.arrays.items()}
    dtype = {n: v.astype(np.float64) for n, v in good.arrays.items()}
    return [
        SiteUpdate("site-0", nan, 10),
        SiteUpdate("site-1", shape, 10),
        SiteUpdate("site-2", missing, 10),
        SiteUpdate("site-3", scaled, 10),
        SiteUpdate("site-4", dtype, 10),
        SiteUpdate("intruder", dict(good.arrays), 10),
        SiteUpdate("site-0", dict(good.arrays), 10),
    ]


def _expected(updates: list[SiteUpdate]) -> dict:
    return {
        n: weighted_sum([u.arrays[n] for u in updates], [u.num_examples for u in updates]) for n in updates[0].arrays
    }


def test_bad_replies_are_rejected_and_the_aggregate_is_that_of_the_good_ones() -> None:
    rng = np.random.default_rng(0)
    current = random_adapter(rng)
    good = _good(rng, current)
    bad = _bad(current, good[0])
    # the bad replies claim the good sites' names; the good replies come last, so the duplicates are the good ones
    renamed = [SiteUpdate(f"{u.site}-good", u.arrays, u.num_examples) for u in good]
    robust = RobustAggregator(FedAvgAggregator(), known_sites=SITES + [u.site for u in renamed])
    result = robust.aggregate(current, bad + renamed)
    for name, value in _expected(renamed).items():
        np.testing.assert_allclose(result[name], value, rtol=1e-5, atol=1e-6)
    reasons: dict[str, str] = {}
    for site, reason in robust.last_rejections:
        reasons[site] = reasons.get(site, "") + reason + "; "
    assert "non-finite" in reasons["site-0"] and "second reply" in reasons["site-0"]
    assert "shape" in reasons["site-1"]
    assert "missing" in reasons["site-2"]
    assert "norm" in reasons["site-3"]
    assert "dtype" in reasons["site-4"]
    assert "unknown site" in reasons["intruder"]
    assert len(robust.last_rejections) == 7
    assert all(isinstance(site, str) and isinstance(reason, str) for site, reason in robust.last_rejections)


def test_a_scaled_reply_in_round_one_is_caught_against_the_median_of_the_replies() -> None:
    rng = np.random.default_rng(1)
    init = random_adapter(rng)
    good = _good(rng, init)[:4]
    scaled = SiteUpdate(
        "site-4", {n: (init[n] + 1e6 * (v - init[n])).astype(np.float32) for n, v in good[0].arrays.items()}, 50
    )
    robust = RobustAggregator(FedAvgAggregator())
    result = robust.aggregate({}, good + [scaled])
    assert [site for site, _ in robust.last_rejections] == ["site-4"]
    for name, value in _expected(good).items():
        np.testing.assert_allclose(result[name], value, rtol=1e-5, atol=1e-6)


def test_an_absolute_bound_applies_and_nothing_left_keeps_the_current_arrays() -> None:
    rng = np.random.default_rng(2)
    current = random_adapter(rng)
    robust = RobustAggregator(FedAvgAggregator(), max_update_norm=1e-3)
    result = robust.aggregate(current, _good(rng, current))
    assert len(robust.last_rejections) == 5 and all("bound" in r for _, r in robust.last_rejections)
    for name, value in current.items():
        np.testing.assert_array_equal(result[name], value)


def test_clipping_scales_each_difference_to_the_bound() -> None:
    rng = np.random.default_rng(3)
    current = random_adapter(rng)
    good = _good(rng, current)
    robust = RobustAggregator(FedAvgAggregator(), clip_norm=0.5, max_norm_ratio=None)
    result = robust.aggregate(current, good)
    clipped = []
    for update in good:
        norm = np.sqrt(sum(np.sum((update.arrays[n].astype(np.float64) - current[n]) ** 2) for n in current))
        factor = min(1.0, 0.5 / norm)
        clipped.append({n: current[n] + factor * (update.arrays[n].astype(np.float64) - current[n]) for n in current})
    assert sorted(robust.last_clipped) == SITES
    for name in current:
        np.testing.assert_allclose(result[name], weighted_sum([c[name] for c in clipped], COUNTS), rtol=1e-5, atol=1e-6)


def test_under_ffa_replies_without_a_pass_and_a_missing_b_does_not() -> None:
    rng = np.random.default_rng(4)
    current = random_adapter(rng)
    good = [
        SiteUpdate(u.site, {n: u.arrays[n] for n in ffa_trainable_names(u.arrays)}, u.num_examples)
        for u in _good(rng, current)
    ]
    broken = {n: v for n, v in good[0].arrays.items() if n != lora_name(0, "query", "B")}
    robust = RobustAggregator(FFAAggregator())
    result = robust.aggregate(current, good + [SiteUpdate("site-5", broken, 10)])
    assert [site for site, _ in robust.last_rejections] == ["site-5"]
    assert "missing" in robust.last_rejections[0].reason
    np.testing.assert_array_equal(result[lora_name(0, "query", "A")], current[lora_name(0, "query", "A")])


def test_bad_bounds_and_example_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        RobustAggregator(FedAvgAggregator(), clip_norm=0)
    rng = np.random.default_rng(5)
    current = random_adapter(rng)
    updates = _good(rng, current)
    updates[2] = SiteUpdate("site-2", updates[2].arrays, 0)
    robust = RobustAggregator(FedAvgAggregator(), max_examples=45)
    robust.aggregate(current, updates)
    assert {site for site, _ in robust.last_rejections} == {"site-2", "site-4"}
