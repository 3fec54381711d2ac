"""The typed run config: pyproject defaults, unknown keys, bad values."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedcl.run_config import ConfigError, RunConfig, parse_run_config

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pyproject_config() -> dict:
    with PYPROJECT.open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_key_with_the_dataclass_default():
    declared = pyproject_config()
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
    assert set(declared) == set(fields)
    for key, value in declared.items():
        assert value == fields[key], key


def test_pyproject_defaults_parse():
    assert parse_run_config(pyproject_config()) == RunConfig()


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("lora-rank", 0, "lora-rank"),
        ("num-rounds", -1, "num-rounds"),
        ("partition", "random", "iid, dirichlet, group"),
        ("test-fraction", 1.5, "between 0 and 1"),
        ("learning-rate", 0.0, "learning-rate"),
        ("num-rounds", "three", "whole number"),
        ("lora-rank", 2.5, "whole number"),
        ("lora-target-modules", " , ", "at least one module"),
    ],
)
def test_bad_values_name_key_value_and_fix(key, value, words):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    message = str(err.value)
    assert f"'{key}'" in message and repr(value) in message and words in message
    assert "\n" not in message


def test_unknown_key_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown key.*num-rounds"):
        parse_run_config({"num-round": 3})


def test_group_partition_needs_a_group_column():
    with pytest.raises(ConfigError, match="group-column"):
        parse_run_config({"partition": "group"})
