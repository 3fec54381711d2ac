"""The server's aggregation from the run config: build it, checkpoint its state, summarise its rejections.

``strategy`` picks the rule (fedavg, ffa, exact), ``robust`` the checks and
robust combine rule around it, ``server-optimizer`` FedAdam/FedYogi on top,
``compression`` the wire codec; :func:`strategies.registry.build_aggregator`
composes them. ``max-update-norm`` is a rejection bound, except with
``robust = "clip"``, where over-long updates are scaled down to it instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcl.atomic_files import save_arrays_atomic
from fedcl.run_config import RunConfig
from strategies.aggregation import Aggregator
from strategies.registry import build_aggregator, build_compression
from strategies.site_strategy import SiteStrategy

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


def build_strategy(config: RunConfig, round_config: Callable[[int], dict[str, Any]] | None = None) -> SiteStrategy:
    """The Flower strategy for this run: every site in every round, the configured aggregator and codec."""
    return SiteStrategy(
        build_site_aggregator(config),
        num_sites=config.num_sites,
        round_config=round_config,
        compression=build_compression(config.compression),
    )


def save_strategy_state(checkpoint_dir: Path, strategy: SiteStrategy) -> Path | None:
    """Write the aggregator's state (server optimiser moments, exact's carried residual) atomically, if it has any.

    Flower does not keep strategy state across a restart; this file is what a
    resume would load with ``aggregator.load_state_dict(dict(numpy.load(path)))``.
    """
    state = getattr(strategy.aggregator, "state_dict", dict)()
    if not state:
        return None
    path = checkpoint_dir / STATE_FILE
    save_arrays_atomic(path, state)
    return path


def aggregation_summary(config: RunConfig, strategy: SiteStrategy) -> dict[str, Any]:
    """The ``aggregation`` object of summary.json: the settings, and every rejected update counted by site."""
    rejected = [
        (server_round, reply)
        for server_round, replies in sorted(strategy.train_replies.items())
        for reply in replies
        if reply.status == "rejected"
    ]
    residuals = [
        d["relative_residual"] for _, d in sorted(strategy.round_diagnostics.items()) if "relative_residual" in d
    ]
    return {
        "strategy": config.strategy,
        "robust": config.robust,
        "server_optimizer": config.server_optimizer,
        "compression": config.compression,
        "attack": config.attack,
        "rejected_total": len(rejected),
        "rejected_by_site": dict(Counter(reply.site for _, reply in rejected)),
        "rejections": [{"round": r, "site": reply.site, "reason": reply.reason} for r, reply in rejected],
        "relative_residual_last": residuals[-1] if residuals else None,
    }
