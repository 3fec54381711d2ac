"""Data sources and site splits: coverage, reproducibility, skew, errors."""

import numpy as np
import pytest

from fedcl.run_config import ConfigError, RunConfig
from simulations.data_sources import load_dataset
from simulations.scenarios import assign_sites, split_sites

LABELS = np.repeat(np.arange(5), 200)  # 1,000 examples, 5 balanced labels


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_every_example_is_in_exactly_one_site(partition):
    config = RunConfig(partition=partition, num_sites=4)
    sites = split_sites(LABELS, None, config)
    held = np.concatenate([np.concatenate([s.train, s.test]) for s in sites])
    assert sorted(held.tolist()) == list(range(len(LABELS)))
    for site in sites:
        assert not set(site.train) & set(site.test)


def test_split_is_reproducible_from_the_seed():
    first = split_sites(LABELS, None, RunConfig(seed=7))
    again = split_sites(LABELS, None, RunConfig(seed=7))
    other = split_sites(LABELS, None, RunConfig(seed=8))
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test) for a, b in zip(first, again))
    assert not all(np.array_equal(a.train, b.train) for a, b in zip(first, other))


def _label_shares(parts):
    return np.array([np.bincount(LABELS[p], minlength=5) / len(p) for p in parts])


def test_dirichlet_skew_is_visible_and_grows_as_alpha_shrinks():
    iid = _label_shares(assign_sites(LABELS, None, RunConfig(partition="iid", num_sites=3)))
    mild = _label_shares(
        assign_sites(LABELS, None, RunConfig(partition="dirichlet", dirichlet_alpha=10.0, num_sites=3))
    )
    strong = _label_shares(
        assign_sites(LABELS, None, RunConfig(partition="dirichlet", dirichlet_alpha=0.1, num_sites=3))
    )

    def spread(shares):  # mean total-variation x2 from uniform
        return np.abs(shares - 0.2).sum(axis=1).mean()

    assert spread(iid) < 0.15
    assert spread(strong) > spread(mild) > spread(iid)
    assert spread(strong) > 0.8


def test_group_partition_gives_one_site_per_largest_group():
    groups = ["a"] * 500 + ["b"] * 300 + ["c"] * 200
    parts = assign_sites(LABELS, groups, RunConfig(partition="group", group_column="g", num_sites=2))
    assert [len(p) for p in parts] == [500, 300]
    with pytest.raises(ConfigError, match="num-sites <= 3"):
        assign_sites(LABELS, groups, RunConfig(partition="group", group_column="g", num_sites=4))


def test_fewer_examples_than_sites_is_a_config_error():
    with pytest.raises(ConfigError, match="num-sites"):
        split_sites(np.arange(5), None, RunConfig(num_sites=4))


def test_caps_limit_each_site():
    sites = split_sites(LABELS, None, RunConfig(max_train_examples=10, max_test_examples=3))
    assert all(len(s.train) == 10 and len(s.test) == 3 for s in sites)


def test_csv_columns_and_errors(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("answer,qtype,source\nfirst text,x,s1\nsecond text,y,s2\n,x,s1\n", encoding="utf-8")
    data = load_dataset(RunConfig(dataset=str(path), text_column="answer", label_column="qtype", group_column="source"))
    assert data.texts == ["first text", "second text"]  # the row with an empty text is dropped
    assert data.label_names == ["x", "y"] and data.labels.tolist() == [0, 1] and data.groups == ["s1", "s2"]
    with pytest.raises(ConfigError, match="'label-column' = 'missing'.*available columns: answer, qtype, source"):
        load_dataset(RunConfig(dataset=str(path), text_column="answer", label_column="missing"))
    with pytest.raises(ConfigError, match="no such file"):
        load_dataset(RunConfig(dataset=str(tmp_path / "absent.csv")))


def test_jsonl_source(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "p"}\n{"text": "b", "label": "q"}\n', encoding="utf-8")
    data = load_dataset(RunConfig(dataset=str(path)))
    assert data.texts == ["a", "b"] and data.label_names == ["p", "q"]


def test_bbc_news_ships_in_a_package_with_stable_labels():
    data = load_dataset(RunConfig())
    assert len(data) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(data.labels).min() > 300
