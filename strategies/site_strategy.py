"""The Flower strategy that runs a numpy aggregation rule and keeps every site's reply.

It reuses Flower's FedAvg round loop (sampling, messages, evaluation) and
overrides only the configure and aggregation hooks: the downlink goes through
the run's :class:`~strategies.wire.WireFormat` (FFA: no frozen A; fp16/int8
codecs), replies are decoded and become :class:`SiteUpdate` objects for the
configured :class:`Aggregator`, and every reply (trained, skipped, failed, or
rejected by the robust wrapper or the decoder, with the reason) is kept per
round so the server can write one row per site. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcl.protocol import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, SITE_RECORD, to_numpy, to_record
from strategies.aggregation import Aggregator, Arrays, SiteUpdate
from strategies.compression import Compression
from strategies.wire import WireFormat

__all__ = [
    "ARRAYS_RECORD",
    "CONFIG_RECORD",
    "METRICS_RECORD",
    "SITE_RECORD",
    "SiteReply",
    "SiteStrategy",
    "to_numpy",
    "to_record",
]


@dataclass
class SiteReply:
    """What one site said in one round (train or evaluate), for the run report."""

    site: str
    status: str  # "trained", "skipped", "evaluated", "failed" or "rejected" (by the server)
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    bytes_up: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def _site_of(message: Message, known: dict[int, str]) -> tuple[str, dict[str, Any]]:
    """The replying site's name and record; an error reply has no content: the name its node had before."""
    node = message.metadata.src_node_id
    fallback = known.get(node, f"node-{node}")
    if message.has_error() or not message.has_content():
        return fallback, {}
    content = message.content
    if SITE_RECORD in content.config_records:
        info = dict(content.config_records[SITE_RECORD])
        known[node] = str(info.get("site", fallback))
        return known[node], info
    return fallback, {}


def _reject(server_round: int, reply: SiteReply, reason: str) -> None:
    reply.status, reply.reason = "rejected", reason
    log(WARNING, "round %s: rejected the update of %s: %s", server_round, reply.site, reason)


def aggregation_diagnostics(aggregator: Aggregator) -> dict[str, float]:
    """Per-round figures the aggregator (or one it wraps) reports: exact's residual, FFA's A deviation, clipping."""
    found: dict[str, float] = {}
    layer: Any = aggregator
    while layer is not None:
        if hasattr(layer, "last_relative_residual"):
            found["relative_residual"] = float(layer.last_relative_residual)
        if hasattr(layer, "last_a_deviation"):
            found["ffa_a_deviation"] = float(layer.last_a_deviation)
        if hasattr(layer, "last_clipped"):
            found["clipped"] = len(layer.last_clipped)
        layer = getattr(layer, "inner", None)
    return found


class SiteStrategy(FedAvg):
    """FedAvg's round loop with a pluggable numpy aggregator and per-site reply records."""

    def __init__(
        self,
        aggregator: Aggregator,
        num_sites: int,
        round_config: Callable[[int], dict[str, Any]] | None = None,
        compression: Compression | None = None,
    ) -> None:
        super().__init__(min_train_nodes=num_sites, min_evaluate_nodes=num_sites, min_available_nodes=num_sites)
        self.aggregator = aggregator
        self.round_config = round_config or (lambda server_round: {})
        self.wire = WireFormat(aggregator, compression)
        self.current: Arrays = {}
        self.train_replies: dict[int, list[SiteReply]] = {}
        self.evaluate_replies: dict[int, list[SiteReply]] = {}
        self.bytes_down: dict[tuple[int, str], int] = {}  # (round, "train"/"evaluate") -> array bytes per message
        self.round_diagnostics: dict[int, dict[str, float]] = {}  # round -> e.g. relative_residual, rejected
        self._node_sites: dict[int, str] = {}  # node id -> site name, to name a site whose reply is an error

    def _downlink(self, server_round: int, arrays: ArrayRecord, kind: str) -> ArrayRecord:
        record = to_record(self.wire.downlink(server_round, to_numpy(arrays), kind))
        self.bytes_down[(server_round, kind)] = record.count_bytes()
        return record

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling and messages, with this round's entries (e.g. its phase) added to the config."""
        round_config = ConfigRecord({**dict(config), **self.round_config(server_round)})
        return super().configure_train(server_round, self._downlink(server_round, arrays, "train"), round_config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation messages, carrying the same wire format as training."""
        return super().configure_evaluate(server_round, self._downlink(server_round, arrays, "evaluate"), config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the trained sites' arrays; record every reply (rejected ones with the reason)."""
        records: list[SiteReply] = []
        pending: list[tuple[SiteUpdate, SiteReply]] = []
        for message in replies:
            site, info = _site_of(message, self._node_sites)
            if message.has_error():
                records.append(SiteReply(site, "failed", reason=message.error.reason))
                log(WARNING, "round %s: %s failed: %s", server_round, site, message.error.reason)
                continue
            content = message.content
            metrics = dict(content.metric_records.get(METRICS_RECORD, MetricRecord()))
            status = str(info.get("status", "trained"))
            if status != "trained" or ARRAYS_RECORD not in content.array_records:
                reason = str(info.get("reason", "no update sent"))
                records.append(SiteReply(site, "skipped", reason, metrics, info=info))
                log(INFO, "round %s: %s sent no update: %s", server_round, site, reason)
                continue
            record = content.array_records[ARRAYS_RECORD]
            reply = SiteReply(site, "trained", "", metrics, bytes_up=record.count_bytes(), info=info)
            records.append(reply)
            try:
                arrays = self.wire.decode_uplink(server_round, to_numpy(record))
            except ValueError as err:
                _reject(server_round, reply, f"cannot decode the update ({self.wire.codec}): {err}")
                continue
            pending.append((SiteUpdate(site, arrays, int(metrics.get("num-examples", 0))), reply))
        self.train_replies[server_round] = records
        if not pending:
            log(WARNING, "round %s: no site sent an update; the global adapter stays as it was", server_round)
            return None, None
        self.current = self.aggregator.aggregate(self.current, [update for update, _ in pending])
        accepted = self._apply_checks(server_round, pending)
        diagnostics = aggregation_diagnostics(self.aggregator)
        diagnostics["rejected"] = sum(r.status == "rejected" for r in records)
        self.round_diagnostics[server_round] = diagnostics
        total = sum(u.num_examples for u, _ in accepted) or 1
        mean_loss = sum(u.num_examples * r.metrics.get("train-loss", 0.0) for u, r in accepted) / total
        return to_record(self.current), MetricRecord(
            {"train-loss": float(mean_loss), "sites-trained": len(accepted), "sites-rejected": diagnostics["rejected"]}
        )

    def _apply_checks(
        self, server_round: int, pending: list[tuple[SiteUpdate, SiteReply]]
    ) -> list[tuple[SiteUpdate, SiteReply]]:
        """Mark the replies the aggregator rejected; note update norms and clipping; return the accepted ones."""
        norms = getattr(self.aggregator, "last_update_norms", {})
        clipped = set(getattr(self.aggregator, "last_clipped", []))
        for _, reply in pending:
            if reply.site in norms:
                reply.metrics["update-norm"] = float(norms[reply.site])
            if reply.site in clipped:
                reply.metrics["clipped"] = 1
        for rejection in getattr(self.aggregator, "last_rejections", []):
            # A site's second reply in one round is the one rejected first: mark the last unmarked one.
            match = [r for _, r in pending if r.site == rejection.site and r.status == "trained"]
            if match:
                _reject(server_round, match[-1], rejection.reason)
        return [(update, reply) for update, reply in pending if reply.status == "trained"]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every site's evaluation; return the unweighted mean accuracy over sites."""
        records = []
        for message in replies:
            site, info = _site_of(message, self._node_sites)
            if message.has_error():
                records.append(SiteReply(site, "failed", reason=message.error.reason))
                log(WARNING, "round %s: evaluation at %s failed: %s", server_round, site, message.error.reason)
                continue
            metrics = dict(message.content.metric_records.get(METRICS_RECORD, MetricRecord()))
            records.append(SiteReply(site, "evaluated", "", metrics, info=info))
        self.evaluate_replies[server_round] = records
        accuracies = [r.metrics["accuracy"] for r in records if "accuracy" in r.metrics]
        if not accuracies:
            return None
        return MetricRecord({"accuracy": float(np.mean(accuracies)), "sites-evaluated": len(accuracies)})
