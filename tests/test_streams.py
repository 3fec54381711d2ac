"""Streams: global plans reproducible from a seed, disjoint and covering; per-site arrays vs plain loops and Avalanche."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcl.run_config import ConfigError
from simulations.data_sources import LabelledTexts
from simulations.scenarios import SiteSplit
from simulations.streams import ExperiencePlan, experience_labels, plan_experiences, site_streams

NAMES = ["billing", "cardio", "derm", "neuro", "onco", "ortho", "peds"]
DOMAIN = {
    "billing": "admin",
    "cardio": "heart",
    "derm": "skin",
    "neuro": "brain",
    "onco": "cancer",
    "ortho": "bones",
    "peds": "admin",
}


def toy_data(per_label: int = 6) -> LabelledTexts:
    """7 labels x ``per_label`` examples, the group of each example is its label's domain."""
    labels = np.repeat(np.arange(len(NAMES)), per_label)
    np.random.default_rng(0).shuffle(labels)
    groups = [DOMAIN[NAMES[y]] for y in labels]
    return LabelledTexts([f"text {i}" for i in range(len(labels))], labels.astype(np.int64), NAMES, groups)


def two_sites(data: LabelledTexts) -> list[SiteSplit]:
    order = np.random.default_rng(1).permutation(len(data))
    first, second = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
    return [
        SiteSplit("site-0", first[: len(first) * 2 // 3], first[len(first) * 2 // 3 :]),
        SiteSplit("site-1", second[: len(second) * 2 // 3], second[len(second) * 2 // 3 :]),
    ]


def loop_reference(
    owner_of_name: dict[str, int], keys: list[str], split_part: np.ndarray, experience: int
) -> list[int]:
    """Positions of ``split_part`` whose key belongs to ``experience``, by a plain loop."""
    return [pos for pos, index in enumerate(split_part) if owner_of_name[keys[index]] == experience]


def test_seeded_class_split_is_reproducible_disjoint_covering_and_balanced():
    data = toy_data()
    first = plan_experiences(data, "class-incremental", num_experiences=3, seed=11)
    again = plan_experiences(data, "class-incremental", num_experiences=3, seed=11)
    assert first == again
    others = {plan_experiences(data, "class-incremental", num_experiences=3, seed=s).members for s in range(5)}
    assert len(others) > 1  # the seed matters
    flat = [name for group in first.members for name in group]
    assert sorted(flat) == sorted(NAMES) and len(flat) == len(set(flat))
    assert sorted(len(g) for g in first.members) == [2, 2, 3]


def test_seeded_split_leaves_torch_global_random_state_alone():
    data = toy_data()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    plan_experiences(data, "class-incremental", num_experiences=3, seed=5)
    assert torch.equal(before, torch.get_rng_state())


def test_site_arrays_match_avalanche_class_incremental_benchmark_on_the_site_data():
    """Independent reference: Avalanche's generator run directly on one site's train and test data."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.benchmarks.utils.data_attribute import DataAttribute
    from torch.utils.data import TensorDataset

    data = toy_data(per_label=9)
    split = SiteSplit("all", np.arange(0, len(data), 2), np.arange(1, len(data), 2))  # every label in both
    plan = plan_experiences(data, "class-incremental", num_experiences=3, seed=7)
    ours = site_streams(plan, data, [split])[0]

    def dataset(part: np.ndarray) -> AvalancheDataset:
        positions = torch.arange(len(part))
        targets = torch.as_tensor(data.labels[part])
        return AvalancheDataset(
            [TensorDataset(positions, targets)], data_attributes=[DataAttribute(targets.tolist(), "targets")]
        )

    sizes = [len(g) for g in plan.members]
    with torch.random.fork_rng(devices=[]):
        bench = class_incremental_benchmark(
            {"train": dataset(split.train), "test": dataset(split.test)}, num_classes_per_exp=sizes, seed=7
        )
    for stream, attribute in ((bench.train_stream, "train"), (bench.test_stream, "test")):
        for e, experience in enumerate(stream):
            theirs = sorted(int(experience.dataset[i][0]) for i in range(len(experience.dataset)))
            assert theirs == getattr(ours.experiences[e], attribute).tolist()


def test_explicit_groups_keep_their_order_and_sites_get_positions_of_their_labels():
    data = toy_data()
    plan = plan_experiences(data, "class-incremental", groups="onco, derm; billing,peds ;cardio,neuro,ortho")
    assert plan.members == (("onco", "derm"), ("billing", "peds"), ("cardio", "neuro", "ortho"))
    owner = {name: e for e, group in enumerate(plan.members) for name in group}
    keys = [NAMES[y] for y in data.labels]
    sites = two_sites(data)
    for split, stream in zip(sites, site_streams(plan, data, sites)):
        assert len(stream) == 3
        for e, experience in enumerate(stream.experiences):
            assert experience.train.tolist() == loop_reference(owner, keys, split.train, e)
            assert experience.test.tolist() == loop_reference(owner, keys, split.test, e)
        every = np.concatenate([x.train for x in stream.experiences])
        assert sorted(every.tolist()) == list(range(len(split.train)))  # each record in exactly one experience


def test_group_column_makes_class_incremental_domains():
    data = toy_data()
    plan = plan_experiences(data, "class-incremental", unit="group", seed=3)
    assert len(plan) == len(set(DOMAIN.values()))
    labels = experience_labels(plan, data)
    for members, held in zip(plan.members, labels):
        assert {NAMES[y] for y in held} == {n for n, d in DOMAIN.items() if d in members}
    merged = plan_experiences(data, "class-incremental", unit="group", num_experiences=2, seed=3)
    assert sorted(len(m) for m in merged.members) == [3, 3]


def test_domain_incremental_experiences_are_group_values():
    data = toy_data()
    plan = plan_experiences(data, "domain-incremental", unit="group", groups="admin,heart;skin,brain;cancer,bones")
    sites = two_sites(data)
    owner = {value: e for e, group in enumerate(plan.members) for value in group}
    for split, stream in zip(sites, site_streams(plan, data, sites)):
        for e, experience in enumerate(stream.experiences):
            assert experience.train.tolist() == loop_reference(owner, list(data.groups), split.train, e)


def test_an_experience_a_site_lacks_is_empty_not_an_error():
    data = toy_data()
    plan = plan_experiences(data, "class-incremental", groups="billing,cardio;derm,neuro,onco,ortho,peds")
    no_first = np.flatnonzero(~np.isin(data.labels, [0, 1]))
    split = SiteSplit("late-site", no_first[:20], no_first[20:])
    stream = site_streams(plan, data, [split])[0]
    assert stream.experiences[0].is_empty and len(stream.experiences[0].test) == 0
    assert stream.empty_experiences() == [0]
    assert not stream.experiences[1].is_empty


def test_plan_round_trips_through_json():
    plan = plan_experiences(toy_data(), "class-incremental", num_experiences=2, seed=1)
    assert ExperiencePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_no_stream_is_one_experience_with_everything():
    data = toy_data()
    plan = plan_experiences(data, "none")
    stream = site_streams(plan, data, two_sites(data))[0]
    assert len(stream) == 1 and len(stream.experiences[0].train) == len(two_sites(data)[0].train)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(groups="onco,derm;billing,xray"), "unknown labels ['xray']"),
        (dict(groups="onco,derm;derm,billing,peds,cardio,neuro,ortho"), "'derm' is in group 1 and group 2"),
        (dict(num_experiences=8), "num-experiences <= 7"),
        (dict(groups="onco,derm;billing"), "in no group"),
        (dict(groups="onco;;derm"), "group 2 is empty"),
        (dict(), "num-experiences >= 1 or explicit stream-groups"),
        (dict(groups="onco,derm,billing,peds;cardio,neuro,ortho", num_experiences=3), "num-experiences = 0 or 2"),
        (dict(num_experiences=-1), "0 (derived from the groups) or a positive number"),
    ],
)
def test_bad_class_splits_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_experiences(toy_data(), "class-incremental", **kwargs)


def test_group_based_streams_need_a_group_column_that_fits():
    data = toy_data()
    no_groups = LabelledTexts(data.texts, data.labels, data.label_names, None)
    with pytest.raises(ConfigError, match="no group column"):
        plan_experiences(no_groups, "domain-incremental", unit="group")
    with pytest.raises(ConfigError, match="set stream-by = group"):
        plan_experiences(data, "domain-incremental", unit="label", num_experiences=2)
    mixed = LabelledTexts(data.texts, data.labels, data.label_names, ["a" if i % 2 else "b" for i in range(len(data))])
    with pytest.raises(ConfigError, match="groups do not split the labels"):
        plan_experiences(mixed, "class-incremental", unit="group")
    with pytest.raises(ConfigError, match="use one of"):
        plan_experiences(data, "task-incremental")


@pytest.mark.slow
def test_clinc150_domains_make_five_experiences_of_thirty_intents():
    from fedcl.run_config import RunConfig
    from simulations.data_sources import load_dataset

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    data = load_dataset(RunConfig(dataset=str(path)))
    plan = plan_experiences(data, "class-incremental", unit="group", num_experiences=5, seed=42)
    held = experience_labels(plan, data)
    assert [len(m) for m in plan.members] == [2] * 5
    assert [len(h) for h in held] == [30] * 5
    assert len(np.unique(np.concatenate(held))) == 150
