"""Builds an aggregator from its run-config name and options.

Composition, innermost first: the base rule (``fedavg``, ``ffa``, ``exact``)
with its combine rule (mean, or median / trimmed mean for the robust modes
that say so), then the server optimiser, then the validating wrapper. So a
reply is checked before anything else sees it, and the optimiser steps along
the robustly combined pseudo-gradient.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial

from strategies.aggregation import Aggregator
from strategies.combine import Combine, check_trim_fraction, coordinate_median, trimmed_mean, weighted_mean
from strategies.compression import CODECS, Compression
from strategies.exact import ExactAggregator
from strategies.fedavg import FedAvgAggregator
from strategies.ffa import FFAAggregator
from strategies.robust import RobustAggregator
from strategies.server_optimizer import SERVER_OPTIMIZERS, ServerOptimizer

AGGREGATORS = ("fedavg", "ffa", "exact")
ROBUST_MODES = ("none", "validate", "clip", "median", "trimmed-mean")
SERVER_OPTIMIZER_CHOICES = ("none", *SERVER_OPTIMIZERS)
COMPRESSIONS = CODECS


def _choose(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}: use one of {', '.join(choices)}")


def _combine(robust: str, trim_fraction: float) -> Combine:
    if robust == "median":
        return coordinate_median
    if robust == "trimmed-mean":
        check_trim_fraction(trim_fraction)
        return partial(trimmed_mean, fraction=trim_fraction)
    return weighted_mean


def build_aggregator(
    name: str,
    *,
    robust: str = "none",
    server_optimizer: str = "none",
    server_lr: float = 1e-2,
    known_sites: Collection[str] | None = None,
    max_update_norm: float | None = None,
    max_norm_ratio: float | None = 10.0,
    clip_norm: float | None = None,
    trim_fraction: float = 0.1,
    residual: str = "carry",
) -> Aggregator:
    """The aggregator ``name`` (fedavg, ffa, exact) with the robust mode and server optimiser asked for.

    robust: ``none``; ``validate`` (drop bad replies); ``clip`` (validate, then clip every update's
    norm to ``clip_norm``, which it requires; the other modes clip too when ``clip_norm`` is given);
    ``median`` / ``trimmed-mean`` (validate, then combine each coordinate by its median / its mean
    after cutting ``trim_fraction`` at both ends; fedavg and ffa only). ``known_sites``,
    ``max_update_norm`` and ``max_norm_ratio`` are the checks of :class:`RobustAggregator`.
    server_optimizer: ``none``, ``adam`` or ``yogi`` with learning rate ``server_lr`` (fedavg, ffa).
    residual: what ``exact`` does with the part beyond rank r (``carry`` or ``drop``).
    """
    _choose("strategy", name, AGGREGATORS)
    _choose("robust mode", robust, ROBUST_MODES)
    _choose("server optimiser", server_optimizer, SERVER_OPTIMIZER_CHOICES)
    if name == "exact" and robust in ("median", "trimmed-mean"):
        raise ValueError(
            f"robust={robust!r} does not apply to exact (it averages products B_i A_i, not tensors): "
            "use robust='validate' or 'clip' with exact, or a median with fedavg or ffa"
        )
    if name == "exact" and server_optimizer != "none":
        raise ValueError(
            "a server optimiser does not compose with exact (its factors change basis every round): "
            "use server_optimizer='none' with exact, or adam/yogi with fedavg or ffa"
        )
    if robust == "clip" and clip_norm is None:
        raise ValueError("robust='clip' needs clip_norm: pass a positive bound on each update's L2 norm")
    combine = _combine(robust, trim_fraction)
    aggregator: Aggregator
    if name == "exact":
        aggregator = ExactAggregator(residual=residual)
    elif name == "ffa":
        aggregator = FFAAggregator(combine)
    else:
        aggregator = FedAvgAggregator(combine)
    if server_optimizer != "none":
        aggregator = ServerOptimizer(aggregator, method=server_optimizer, lr=server_lr)
    if robust != "none":
        aggregator = RobustAggregator(
            aggregator,
            known_sites=known_sites,
            max_update_norm=max_update_norm,
            max_norm_ratio=max_norm_ratio,
            clip_norm=clip_norm,
        )
    return aggregator


def build_compression(codec: str) -> Compression:
    """The wire codec ``codec`` (none, fp16, int8) for both directions."""
    _choose("compression", codec, COMPRESSIONS)
    return Compression(codec)
