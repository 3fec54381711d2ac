"""The Flower strategy that runs a numpy aggregation rule and keeps every site's reply.

It reuses Flower's FedAvg round loop (sampling, messages, evaluation) and
overrides only the two aggregation hooks: replies become :class:`SiteUpdate`
objects for the configured :class:`Aggregator`, and every reply (trained,
skipped or failed) is kept per round so the server can write one row per site.
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation import Aggregator, Arrays, SiteUpdate

SITE_RECORD = "site"  # ConfigRecord in every reply: site name, status, reason
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
CONFIG_RECORD = "config"


@dataclass
class SiteReply:
    """What one site said in one round (train or evaluate), for the run report."""

    site: str
    status: str  # "trained", "skipped", "evaluated" or "failed"
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    bytes_up: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def to_numpy(record: ArrayRecord) -> Arrays:
    """An ArrayRecord as a dict of numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: Arrays) -> ArrayRecord:
    """A dict of numpy arrays as an ArrayRecord."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def _site_of(message: Message) -> tuple[str, dict[str, Any]]:
    content = message.content
    if SITE_RECORD in content.config_records:
        info = dict(content.config_records[SITE_RECORD])
        return str(info.get("site", f"node-{message.metadata.src_node_id}")), info
    return f"node-{message.metadata.src_node_id}", {}


class SiteStrategy(FedAvg):
    """FedAvg's round loop with a pluggable numpy aggregator and per-site reply records."""

    def __init__(self, aggregator: Aggregator, num_sites: int,
                 round_config: Callable[[int], dict[str, Any]] | None = None) -> None:
        super().__init__(min_train_nodes=num_sites, min_evaluate_nodes=num_sites, min_available_nodes=num_sites)
        self.aggregator = aggregator
        self.round_config = round_config or (lambda server_round: {})
        self.current: Arrays = {}
        self.train_replies: dict[int, list[SiteReply]] = {}
        self.evaluate_replies: dict[int, list[SiteReply]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling and messages, with this round's entries (e.g. its phase) added to the config."""
        round_config = ConfigRecord({**dict(config), **self.round_config(server_round)})
        return super().configure_train(server_round, arrays, round_config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the trained sites' arrays; record every reply."""
        records, updates = [], []
        for message in replies:
            site, info = _site_of(message)
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
            arrays = to_numpy(record)
            updates.append(SiteUpdate(site, arrays, int(metrics.get("num-examples", 0))))
            records.append(SiteReply(site, "trained", "", metrics, bytes_up=record.count_bytes(), info=info))
        self.train_replies[server_round] = records
        if not updates:
            log(WARNING, "round %s: no site sent an update; the global adapter stays as it was", server_round)
            return None, None
        self.current = self.aggregator.aggregate(self.current, updates)
        trained = [r for r in records if r.status == "trained"]
        total = sum(u.num_examples for u in updates) or 1
        mean_loss = sum(u.num_examples * r.metrics.get("train-loss", 0.0) for u, r in zip(updates, trained)) / total
        return to_record(self.current), MetricRecord({"train-loss": float(mean_loss), "sites-trained": len(updates)})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every site's evaluation; return the unweighted mean accuracy over sites."""
        records = []
        for message in replies:
            site, info = _site_of(message)
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
