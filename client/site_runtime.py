"""Everything one site needs for a message: its config, its data splits and the model.

Data are loaded, split and tokenised once per process and kept (in a
simulation one worker serves several virtual sites; in a deployment each
message starts a fresh process, so this is rebuilt each time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from client.local_training import Encoded, encode
from fedcl.model_factory import AdapterModel, load_adapter_model
from fedcl.run_config import ConfigError, RunConfig, parse_run_config
from simulations.data_sources import LabelledTexts, load_dataset
from simulations.scenarios import SiteSplit, split_sites


@dataclass(frozen=True)
class SiteData:
    """One site's tokenised train and test splits."""

    name: str
    index: int
    train: Encoded
    test: Encoded
    label_names: list[str]


@dataclass(frozen=True)
class SiteRuntime:
    """The parsed config, this site's data and the shared adapter model."""

    config: RunConfig
    data: SiteData
    adapter: AdapterModel


_DATASETS: dict[tuple, tuple[LabelledTexts, list[SiteSplit]]] = {}
_ENCODED: dict[tuple, SiteData] = {}


def site_index(node_config: Mapping[str, Any], config: RunConfig) -> int:
    """This node's site number, from node config ``partition-id`` (checked against ``num-sites``)."""
    if "partition-id" not in node_config:
        raise ConfigError(
            "node config 'partition-id' is missing; start the SuperNode with --node-config \"partition-id=0 num-partitions=N\""
        )
    index = int(node_config["partition-id"])
    partitions = int(node_config.get("num-partitions", config.num_sites))
    if partitions != config.num_sites:
        raise ConfigError(
            f"config key 'num-sites' = {config.num_sites}: the federation has {partitions} sites; "
            f"set num-sites = {partitions} (or start {config.num_sites} SuperNodes)"
        )
    if not 0 <= index < config.num_sites:
        raise ConfigError(f"node config 'partition-id' = {index}: use 0 .. {config.num_sites - 1}")
    return index


def _data_key(config: RunConfig) -> tuple:
    """The settings that decide the dataset and its split into sites."""
    return (
        config.dataset,
        config.text_column,
        config.label_column,
        config.group_column,
        config.partition,
        config.dirichlet_alpha,
        config.num_sites,
        config.test_fraction,
        config.max_train_examples,
        config.max_test_examples,
        config.seed,
    )


def dataset_and_sites(config: RunConfig) -> tuple[LabelledTexts, list[SiteSplit]]:
    """Load the dataset and split it into sites (cached per process)."""
    key = _data_key(config)
    if key not in _DATASETS:
        data = load_dataset(config)
        _DATASETS[key] = (data, split_sites(data.labels, data.groups, config))
    return _DATASETS[key]


def site_data(config: RunConfig, index: int, tokenizer: Any) -> SiteData:
    """This site's splits, tokenised (cached per process)."""
    key = (*_data_key(config), config.model, config.max_length, index)
    if key not in _ENCODED:
        data, sites = dataset_and_sites(config)
        split = sites[index]
        _ENCODED[key] = SiteData(
            name=split.name,
            index=index,
            train=encode(tokenizer, [data.texts[i] for i in split.train], data.labels[split.train], config.max_length),
            test=encode(tokenizer, [data.texts[i] for i in split.test], data.labels[split.test], config.max_length),
            label_names=data.label_names,
        )
    return _ENCODED[key]


def site_runtime(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> SiteRuntime:
    """Assemble the runtime for one message from Flower's run and node configs."""
    config = parse_run_config(run_config)
    index = site_index(node_config, config)
    data, _ = dataset_and_sites(config)
    adapter = load_adapter_model(config, num_labels=len(data.label_names))
    return SiteRuntime(config, site_data(config, index, adapter.tokenizer), adapter)
