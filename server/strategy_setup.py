"""The server's aggregation from the run config: build it, checkpoint its state, summarise its rejections.

``strategy`` picks the rule (fedavg, ffa, exact), ``robust`` the checks and
robust combine rule around it, ``server-optimizer`` FedAdam/FedYogi on top,
``compression`` the wire codec; :func:`strategies.registry.build_aggregator`
composes them. ``max-update-norm`` is a rejection bound, except with
``robust = "clip"``, where over-long updates are scaled down to it instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedcl.atomic_files import save_arrays_atomic
from fedcl.run_config import RunConfig
from fedcl.secure_adapter import ADAPTER_BITS, adapter_scale
from fedcl.secure_ncm import server_bits
from strategies.aggregation import Aggregator
from strategies.node_sampling import EvaluationSampling
from strategies.registry import build_aggregator, build_compression
from strategies.secure_releases import AdapterUpdateRelease, ClassSumRelease, SecureRelease
from strategies.secure_rounds import SecureRounds
from strategies.site_strategy import SiteStrategy, aggregator_state, load_aggregator_state

STATE_FILE = "strategy_state.npz"  # beside checkpoint/global.npz


def build_site_aggregator(config: RunConfig) -> Aggregator:
    """The aggregator the run config asks for (rule, robust wrapper, server optimiser)."""
    clip = config.robust == "clip"
    return build_aggregator(
        config.strategy,
        robust=config.robust,
        server_optimizer=config.server_optimizer,
        server_lr=config.server_learning_rate,
        max_update_norm=None if clip or config.max_update_norm == 0 else config.max_update_norm,
        max_norm_ratio=config.max_norm_ratio or None,
        clip_norm=config.max_update_norm if clip else None,
        trim_fraction=config.trim_fraction,
    )


def build_strategy(
    config: RunConfig,
    round_config: Callable[[int], dict[str, Any]] | None = None,
    aggregator: Aggregator | None = None,
    every_site: Callable[[int], bool] | None = None,
) -> SiteStrategy:
    """The Flower strategy for this run.

    Every connected site trains in every round; ``eval-fraction`` of them
    evaluate, every one in the rounds where ``every_site(round)`` (default:
    the last round of the plain schedule); ``min-replies`` usable replies
    for a round to count, the configured aggregator (or ``aggregator``, e.g.
    the class-sum adder) and codec; with ``secure-aggregation``, the
    protocol's stages around every training round (``strategies/secure_rounds.py``).
    """
    last = config.total_rounds
    sampling = EvaluationSampling(
        config.eval_fraction, config.seed, every_site or (lambda server_round: server_round >= last)
    )
    return SiteStrategy(
        aggregator or build_site_aggregator(config),
        num_sites=config.num_sites,
        round_config=round_config,
        compression=build_compression(config.compression),
        required_replies=config.required_replies,
        wait_timeout=config.round_timeout,
        registered_nodes=config.site_node_ids,
        evaluation_sampling=sampling,
        secure=secure_rounds(config),
    )


def secure_rounds(config: RunConfig) -> SecureRounds | None:
    """The secure-aggregation driver of a ``secure-aggregation`` run (public bit width, ``n_h``, ``c``), else None.

    A round asks at most ``num-sites`` nodes, the count the bit width is computed for.
    """
    if not config.secure_aggregation:
        return None
    if config.chosen_recipe == "ncm":
        bits = server_bits(config.num_sites, config.max_train_examples, config.honest_sites, config.noise_multiplier)
        release: SecureRelease = ClassSumRelease()
    else:  # probe and LoRA rounds: the sites' weighted tensors (fedcl/secure_adapter.py)
        bits = ADAPTER_BITS
        release = AdapterUpdateRelease(adapter_scale(config.num_sites, config.max_train_examples, bits))
    return SecureRounds(
        config.honest_sites,
        bits,
        config.round_timeout,
        config.secagg_max_colluders,
        max_sites=config.num_sites,
        release=release,
    )


def save_strategy_state(checkpoint_dir: Path, strategy: SiteStrategy) -> Path | None:
    """Write the aggregator's state (server optimiser moments, exact's carried residual) atomically, if it has any.

    Flower does not keep strategy state across a restart; :func:`restore_strategy_state`
    puts this file's arrays back (the server's resume reads the same arrays
    from ``checkpoint/resume.npz``, written with them in one piece).
    """
    state = aggregator_state(strategy.aggregator)
    if not state:
        return None
    path = checkpoint_dir / STATE_FILE
    save_arrays_atomic(path, state)
    return path


def restore_strategy_state(strategy: SiteStrategy, state: Mapping[str, np.ndarray]) -> None:
    """Load what :func:`save_strategy_state` wrote (e.g. ``dict(numpy.load(path))``) into the strategy's aggregator.

    Raises ValueError when the state does not belong to this aggregator (one
    without state given arrays).
    """
    load_aggregator_state(strategy.aggregator, dict(state))


def aggregation_summary(
    config: RunConfig, strategy: SiteStrategy, earlier_rows: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The ``aggregation`` object of summary.json: the settings, and every rejected update counted by site.

    ``earlier_rows``: the metrics rows of the rounds before a resume (this
    session's strategy only saw the rounds after it).
    """
    rejected = [
        (int(row["round"]), str(row["site"]), str(row.get("train_reason", "")))
        for row in earlier_rows
        if row.get("train_status") == "rejected"
    ] + [
        (server_round, reply.site, reply.reason)
        for server_round, replies in sorted(strategy.train_replies.items())
        for reply in replies
        if reply.status == "rejected"
    ]
    residuals = [r["relative_residual"] for r in earlier_rows if r.get("relative_residual") is not None] + [
        d["relative_residual"] for _, d in sorted(strategy.round_diagnostics.items()) if "relative_residual" in d
    ]
    return {
        "strategy": config.strategy,
        "robust": config.robust,
        "server_optimizer": config.server_optimizer,
        "compression": config.compression,
        "attack": config.attack,
        "rejected_total": len(rejected),
        "rejected_by_site": dict(Counter(site for _, site, _ in rejected)),
        "rejections": [{"round": r, "site": site, "reason": reason} for r, site, reason in rejected],
        "relative_residual_last": residuals[-1] if residuals else None,
    }
