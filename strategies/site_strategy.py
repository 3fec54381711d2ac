"""The Flower strategy that runs a numpy aggregation rule, keeps every site's reply and never stalls.

It runs Flower's own round loop (``Strategy.start``: configure, send and
receive with the round timeout, aggregate, evaluate) and implements its four
hooks:

- Sampling waits at most the round timeout for ``required_replies`` connected
  nodes (:func:`~strategies.node_sampling.wait_for_nodes`), then sends to
  every node connected (Flower's ``sample_nodes`` would wait for ever).
- Every reply names its site; :class:`~strategies.site_identity.SiteIdentities`
  binds the name to the node and refuses impostors (status ``rejected``).
- The downlink goes through the run's :class:`~strategies.wire.WireFormat`
  (FFA: no frozen A; fp16/int8 codecs); replies are decoded and become
  :class:`SiteUpdate` objects for the configured :class:`Aggregator`.
- A round needs ``required_replies`` sites to take part in training (a
  ``trained`` reply, even one whose update the server's checks then reject,
  or ``skipped`` by the site's own plan or budget) and in evaluation
  (``evaluated``); replies that missed the timeout are recorded as
  ``missing``. A round short of either is **failed**: its update is not
  applied, or is undone after a short evaluation, so the global model
  (:attr:`SiteStrategy.current`, the one the strategy sends) stays as it was.
  A round whose every update is rejected keeps the model too, without failing.

Secure aggregation (``secure``): ``configure_train`` first
runs the protocol's key stages and sends each step-2 site its mask request
with the train message; ``aggregate_train`` unmasks the sum of the masked
releases that arrived and hands the aggregator the one update it decodes to
(the ncm class sums, or the sites' weighted mean tensors:
``strategies/secure_rounds.py``); a round that cannot unmask fails.

Every reply (trained, skipped, refused, failed, missing, or rejected with the
reason) is kept per round for the run report. ``start(..., first_round=k+1)``
continues a run: hooks and ``evaluate_fn`` see the true round numbers. No torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedcl.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    REASON,
    SECAGG_RECORD,
    SERVER_ROUND,
    SITE_NAME,
    SITE_RECORD,
    STATUS,
    to_numpy,
    to_record,
)
from strategies.aggregation import Aggregator, Arrays, SiteUpdate
from strategies.compression import Compression
from strategies.node_sampling import EvaluationSampling, wait_for_nodes
from strategies.secure_rounds import SecureRoundError, SecureRounds, record_bytes
from strategies.site_identity import SiteIdentities
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
    # "trained", "skipped", "refused" (by the site), "evaluated", "failed" (an error reply),
    # "missing" (no reply in time, or not connected) or "rejected" (by the server)
    status: str
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    bytes_up: int = 0  # arrays, plus the secure-aggregation records the site sent
    protocol_bytes_down: int = 0  # the secure-aggregation records sent to the site (keys, requests)
    info: dict[str, Any] = field(default_factory=dict)
    node: int | None = None


def aggregator_state(aggregator: Aggregator) -> Arrays:
    """A copy of the aggregator's state (server optimiser moments, exact's residual); empty if it keeps none."""
    return {name: np.array(value, copy=True) for name, value in getattr(aggregator, "state_dict", dict)().items()}


def load_aggregator_state(aggregator: Aggregator, state: Arrays) -> None:
    """Put back what :func:`aggregator_state` returned; raises ValueError if the aggregator cannot hold state."""
    loader = getattr(aggregator, "load_state_dict", None)
    if loader is not None:
        loader(state)
    elif state:
        raise ValueError(
            f"{type(aggregator).__name__} keeps no state but {len(state)} state arrays were given: "
            "restore a checkpoint with the aggregation settings it was written with"
        )


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


def _reject(server_round: int, reply: SiteReply, reason: str) -> None:
    reply.status, reply.reason = "rejected", reason
    log(WARNING, "round %s: rejected the update of %s: %s", server_round, reply.site, reason)


class SiteStrategy(Strategy):
    """Flower's round loop with a pluggable numpy aggregator, bound site identities and failed rounds."""

    def __init__(
        self,
        aggregator: Aggregator,
        num_sites: int,
        round_config: Callable[[int], dict[str, Any]] | None = None,
        compression: Compression | None = None,
        required_replies: int | None = None,
        wait_timeout: float = 3600.0,
        poll_seconds: float = 1.0,
        registered_nodes: Mapping[str, int] | None = None,
        evaluation_sampling: EvaluationSampling | None = None,
        secure: SecureRounds | None = None,
    ) -> None:
        if not 1 <= (required_replies or num_sites) <= num_sites:
            raise ValueError(f"required_replies = {required_replies}: use 1 .. num_sites ({num_sites}) or None (all)")
        self.aggregator = aggregator
        self.num_sites = num_sites
        self.required_replies = required_replies or num_sites
        self.wait_timeout = wait_timeout  # seconds sampling waits for nodes; start() sets it to the round timeout
        self.poll_seconds = poll_seconds
        self.round_config = round_config or (lambda server_round: {})
        self.wire = WireFormat(aggregator, compression)
        self.identities = SiteIdentities(registered_nodes)
        self.current: Arrays = {}  # the committed global model: what the next round sends
        self.round_offset = 0  # rounds done before start(): Flower's round r is round r + offset of the run
        self.grid: Grid | None = None
        self.train_replies: dict[int, list[SiteReply]] = {}
        self.evaluate_replies: dict[int, list[SiteReply]] = {}
        self.bytes_down: dict[tuple[int, str], int] = {}  # (round, "train"/"evaluate") -> array bytes per message
        self.round_diagnostics: dict[int, dict[str, float]] = {}  # round -> e.g. relative_residual, rejected
        self.round_failures: dict[int, str] = {}  # round -> why it failed
        self.round_unusable: dict[int, list[str]] = {}  # round -> sites whose reply was missing or unusable
        self.updated_rounds: set[int] = set()  # rounds whose aggregated update was kept
        self.sent: dict[tuple[int, str], list[int]] = {}  # (round, kind) -> node ids a message went to
        self.outbox: dict[tuple[int, str], list[Message]] = {}  # (round, kind) -> the messages, until replies are read
        self.committed: tuple[Arrays, Arrays] = ({}, {})  # (global arrays, aggregator state) before this round
        self.evaluation_sampling = evaluation_sampling or EvaluationSampling()
        self.not_asked: dict[int, set[int]] = {}  # round -> connected nodes the sample left out of evaluation
        self.server_seconds: dict[int, float] = {}  # round -> the server's own work (messages, aggregation), not waits
        self.secure = secure  # secure aggregation (strategies/secure_rounds.py), or None
        self.secure_dropped: dict[int, dict[int, str]] = {}  # round -> node -> why it left in the key stages

    # --- the loop --------------------------------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's loop over rounds ``first_round .. num_rounds`` of the run, starting from ``initial_arrays``.

        ``num_rounds`` is the run's last round; ``first_round > 1`` continues a
        checkpointed run. ``timeout`` bounds both the wait for nodes and the
        wait for replies. ``evaluate_fn(round, arrays)`` is called after every
        round with the true round number and the committed global model (not
        before the first round).
        """
        if not 1 <= first_round <= num_rounds:
            raise ValueError(f"first_round = {first_round}: use 1 .. num_rounds ({num_rounds})")
        self.round_offset = first_round - 1
        self.current = to_numpy(initial_arrays)
        self.wait_timeout = timeout

        def after_round(flower_round: int, _arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0 or evaluate_fn is None:
                return None
            return evaluate_fn(self.true_round(flower_round), to_record(self.current))

        return super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds - self.round_offset,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=after_round,
        )

    def true_round(self, flower_round: int) -> int:
        """The run's round number of Flower's ``flower_round`` (they differ in a resumed run)."""
        return flower_round + self.round_offset

    def summary(self) -> None:
        """Log the sampling rule and the aggregator."""
        log(INFO, "\t├──> Sites: %d; a round needs %d replies", self.num_sites, self.required_replies)
        log(INFO, "\t└──> Aggregator: %s, codec %s", type(self.aggregator).__name__, self.wire.codec)

    # --- configure -------------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Training messages for every connected node (after a bounded wait), with this round's config entries.

        Sends :attr:`current`, not ``arrays``: a failed round restores
        :attr:`current`, while Flower's loop keeps the last aggregate it saw.
        """
        server_round = self.true_round(server_round)
        self.grid = grid
        self.committed = ({k: v.copy() for k, v in self.current.items()}, aggregator_state(self.aggregator))
        nodes = wait_for_nodes(grid, self.required_replies, self.wait_timeout, self.poll_seconds)
        entries = {**dict(config), **self.round_config(server_round)}
        if self.secure is None:
            return self._messages(server_round, "train", nodes, entries)
        with self._server_work(server_round):  # stages 1 and 2, before any release
            session = self.secure.open(grid, server_round, nodes, entries)
        self.secure_dropped[server_round] = dict(session.dropped)
        messages = self._messages(server_round, "train", sorted(session.requests), entries)
        for message in messages:  # each step-2 site's own mask request rides in its train message
            node = int(message.metadata.dst_node_id)
            request = ConfigRecord(session.requests[node])
            self.secure.count_bytes(server_round, node, down=record_bytes(request))
            message.content = RecordDict({**dict(message.content), SECAGG_RECORD: request})
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages carrying :attr:`current` for the connected nodes the round's sample chose (no wait)."""
        server_round = self.true_round(server_round)
        self.grid = grid
        connected = sorted(int(n) for n in grid.get_node_ids())
        chosen = self.evaluation_sampling.chosen(server_round, connected)
        self.not_asked[server_round] = set(connected) - set(chosen)
        return self._messages(server_round, "evaluate", chosen, dict(config))

    def required_evaluations(self, server_round: int) -> int:
        """Evaluation replies the round needs: ``required_replies``, scaled to the share of sites sampled."""
        left_out = len(self.not_asked.get(server_round, ()))
        if not left_out:
            return self.required_replies
        asked = len(self.sent.get((server_round, "evaluate"), []))
        return max(1, math.ceil(self.required_replies * asked / (asked + left_out)))

    @contextmanager
    def _server_work(self, server_round: int) -> Iterator[None]:
        """Add the time the block takes to ``server_seconds[server_round]`` (the run's round number).

        Waits for the sites' secure-aggregation stage answers inside the block
        are the sites' time, not the server's own work: they are left out.
        """
        started, waited = time.perf_counter(), self._secure_waits()
        try:
            yield
        finally:
            spent = time.perf_counter() - started - (self._secure_waits() - waited)
            self.server_seconds[server_round] = self.server_seconds.get(server_round, 0.0) + spent

    def _secure_waits(self) -> float:
        return self.secure.waited_seconds if self.secure is not None else 0.0

    def _messages(self, server_round: int, kind: str, nodes: list[int], entries: dict[str, Any]) -> list[Message]:
        with self._server_work(server_round):
            return self._build_messages(server_round, kind, nodes, entries)

    def _build_messages(self, server_round: int, kind: str, nodes: list[int], entries: dict[str, Any]) -> list[Message]:
        arrays = to_record(self.wire.downlink(server_round, self.current, kind))
        self.bytes_down[(server_round, kind)] = arrays.count_bytes()
        self.sent[(server_round, kind)] = list(nodes)
        record = RecordDict(
            {ARRAYS_RECORD: arrays, CONFIG_RECORD: ConfigRecord({**entries, SERVER_ROUND: server_round})}
        )
        message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
        log(INFO, "round %s: %s messages to %d node(s)", server_round, kind, len(nodes))
        # A message lives as long as the round waits for its reply: a site that comes back after the server closed
        # the round never receives it, so it spends no budget on a round whose reply would be discarded.
        messages = [
            Message(content=record, message_type=message_type, dst_node_id=node, ttl=self.wait_timeout)
            for node in nodes
        ]
        self.outbox[(server_round, kind)] = messages  # Flower's grid gives each its message id when it sends it
        return messages

    # --- aggregate -------------------------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the accepted updates if the round has enough usable replies; record every reply."""
        with self._server_work(self.true_round(server_round)):
            aggregated = self._aggregate_train(self.true_round(server_round), replies)
        if self.secure is not None:  # the protocol's records, counted with each site's arrays
            exchanged = self.secure.exchanged_bytes(self.true_round(server_round))
            for reply in self.train_replies.get(self.true_round(server_round), []):
                down, up = exchanged.get(reply.node, (0, 0)) if reply.node is not None else (0, 0)
                reply.bytes_up += up
                reply.protocol_bytes_down = down
        return aggregated

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        records: list[SiteReply] = []
        pending: list[tuple[SiteUpdate, SiteReply]] = []
        for reply, content in self._identified(server_round, "train", replies, records):
            status = str(reply.info.get(STATUS, "trained"))
            if status == "trained" and ARRAYS_RECORD in content.array_records:
                record = content.array_records[ARRAYS_RECORD]
                reply.bytes_up = record.count_bytes()
                if self.secure is not None:  # masked words: nothing to decode or check one by one
                    pending.append((SiteUpdate(reply.site, to_numpy(record), 0), reply))
                    continue
                try:
                    arrays = self.wire.decode_uplink(server_round, to_numpy(record))
                except ValueError as err:
                    _reject(server_round, reply, f"cannot decode the update ({self.wire.codec}): {err}")
                    continue
                pending.append((SiteUpdate(reply.site, arrays, int(reply.metrics.get("num-examples", 0))), reply))
            elif status == "trained":
                _reject(server_round, reply, "the reply says trained but carries no arrays")
            else:
                reply.status = "skipped" if status == "skipped" else "refused"
                reply.reason = str(reply.info.get(REASON, "")) or "no update sent"
                log(INFO, "round %s: %s sent no update (%s): %s", server_round, reply.site, reply.status, reply.reason)
        self.train_replies[server_round] = records
        if len(self._took_part(records, "training")) < self.required_replies:
            session = self.secure.sessions.pop(server_round, None) if self.secure is not None else None
            self._fail(server_round, "training", records, session.failure if session is not None else "")
            return None, None
        if self.secure is not None and pending:
            return self._aggregate_secure(server_round, pending, records)
        if self.secure is not None:
            self.secure.sessions.pop(server_round, None)
        if not pending:
            log(WARNING, "round %s: no site sent an update; the global adapter stays as it was", server_round)
            return None, None
        self.current = self.aggregator.aggregate(self.current, [update for update, _ in pending])
        accepted = self._apply_checks(server_round, pending)
        diagnostics = aggregation_diagnostics(self.aggregator)
        diagnostics["rejected"] = sum(r.status == "rejected" for r in records)
        self.round_diagnostics[server_round] = diagnostics
        if not accepted:
            log(WARNING, "round %s: every update was rejected; the global adapter stays as it was", server_round)
            self._roll_back()
            return None, None
        self.updated_rounds.add(server_round)
        total = sum(u.num_examples for u, _ in accepted) or 1
        mean_loss = sum(u.num_examples * r.metrics.get("train-loss", 0.0) for u, r in accepted) / total
        return to_record(self.current), MetricRecord(
            {"train-loss": float(mean_loss), "sites-trained": len(accepted), "sites-rejected": diagnostics["rejected"]}
        )

    def _aggregate_secure(
        self, server_round: int, pending: list[tuple[SiteUpdate, SiteReply]], records: list[SiteReply]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked releases in ``pending`` and add it as one update; fail the round if it cannot."""
        if self.secure is None:
            raise ValueError("not a secure round: aggregate the updates one by one")
        releases = {int(reply.node): update.arrays for update, reply in pending if reply.node is not None}
        try:
            total = self.secure.finish(self.grid, server_round, releases, self.round_config(server_round), self.current)
        except SecureRoundError as err:
            self._fail(server_round, "training", records, f"secure aggregation: {err}")
            return None, None
        for _, reply in pending:
            if reply.node in total.left_out:
                _reject(server_round, reply, total.left_out[reply.node])
        self.current = self.aggregator.aggregate(self.current, [SiteUpdate("secure-sum", total.update, 1)])
        if getattr(self.aggregator, "last_rejections", []):  # the validator refused the decoded sum itself
            log(WARNING, "round %s: the secure sum was rejected; the global adapter stays as it was", server_round)
            self._roll_back()
            return None, None
        rejected = len(total.left_out)
        self.round_diagnostics[server_round] = {"rejected": rejected}
        self.updated_rounds.add(server_round)
        return to_record(self.current), MetricRecord(
            {"sites-trained": len(pending) - rejected, "sites-rejected": rejected}
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
                reply.metrics["update-clipped"] = 1  # this site's flag; the row's "clipped" is the round's count
        for rejection in getattr(self.aggregator, "last_rejections", []):
            # A site's second reply in one round is the one rejected first: mark the last unmarked one.
            match = [r for _, r in pending if r.site == rejection.site and r.status == "trained"]
            if match:
                _reject(server_round, match[-1], rejection.reason)
        return [(update, reply) for update, reply in pending if reply.status == "trained"]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every site's evaluation; fail the round (undoing its update) if too few sites evaluated.

        Returns the unweighted mean accuracy over the sites that evaluated.
        """
        with self._server_work(self.true_round(server_round)):
            return self._aggregate_evaluate(self.true_round(server_round), replies)

    def _aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        records: list[SiteReply] = []
        for reply, _ in self._identified(server_round, "evaluate", replies, records):
            status = str(reply.info.get(STATUS, "evaluated"))
            if status != "evaluated":
                reply.status, reply.reason = "refused", str(reply.info.get(REASON, "")) or "not evaluated"
                log(WARNING, "round %s: %s did not evaluate: %s", server_round, reply.site, reply.reason)
        self.evaluate_replies[server_round] = records
        evaluated = self._took_part(records, "evaluation")
        if len(evaluated) < self.required_evaluations(server_round):
            if server_round in self.updated_rounds:
                self._roll_back()
                self.updated_rounds.discard(server_round)
            self._fail(server_round, "evaluation", records)
        accuracies = [r.metrics["accuracy"] for r in evaluated if "accuracy" in r.metrics]
        if not accuracies:
            return None
        return MetricRecord({"accuracy": float(np.mean(accuracies)), "sites-evaluated": len(accuracies)})

    # --- replies, identities, failed rounds ------------------------------------------------------------------

    def _identified(
        self, server_round: int, kind: str, replies: Iterable[Message], records: list[SiteReply]
    ) -> Iterable[tuple[SiteReply, RecordDict]]:
        """Record error, rejected and missing replies in ``records``; yield the others (already recorded) with content."""
        connected = {int(n) for n in self.grid.get_node_ids()} if self.grid is not None else set()
        self.identities.begin_round()
        replied: set[int] = set()
        outbox = self.outbox.pop((server_round, kind), [])
        destinations = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in outbox if m.metadata.message_id}
        for message in replies:
            node = int(message.metadata.src_node_id)
            if message.has_error():  # the SuperLink answers for a node that stopped heartbeating, from its own id
                node = destinations.get(message.metadata.reply_to_message_id, node)
            replied.add(node)
            if message.has_error() or not message.has_content():
                reason = message.error.reason if message.has_error() else "an empty reply"
                records.append(SiteReply(self.identities.name_of(node), "failed", reason, node=node))
                log(WARNING, "round %s: %s at %s failed: %s", server_round, kind, records[-1].site, reason)
                continue
            content = message.content
            info = dict(content.config_records.get(SITE_RECORD, ConfigRecord()))
            metrics = dict(content.metric_records.get(METRICS_RECORD, MetricRecord()))
            claim = self.identities.claim(node, str(info.get(SITE_NAME, "") or ""), connected)
            status = "trained" if kind == "train" else "evaluated"
            reply = SiteReply(claim.site, status, "", metrics, info=info, node=node)
            records.append(reply)
            if claim.refused:
                _reject(server_round, reply, claim.refused)
                continue
            yield reply, content
        records.extend(self._missing(server_round, kind, replied))

    def _missing(self, server_round: int, kind: str, replied: set[int]) -> list[SiteReply]:
        """A ``missing`` reply for each node sent a message that did not answer, and each bound site not sent one."""
        sent = self.sent.get((server_round, kind), [])
        late = [
            SiteReply(
                self.identities.name_of(node),
                "missing",
                f"no reply within the round timeout ({self.wait_timeout:g} s)",
                node=node,
            )
            for node in sent
            if node not in replied
        ]
        not_asked = self.not_asked.get(server_round, set()) if kind == "evaluate" else set()
        dropped = self.secure_dropped.get(server_round, {}) if kind == "train" else {}
        late += [
            SiteReply(self.identities.name_of(node), "refused", f"left in the secure key stages: {reason}", node=node)
            for node, reason in sorted(dropped.items())
            if node not in replied
        ]
        absent = [
            SiteReply(name, "missing", "not connected when the round started", node=node)
            for name, node in sorted(self.identities.nodes.items())
            if node not in sent and node not in replied and node not in not_asked and node not in dropped
        ]
        return late + absent

    def _roll_back(self) -> None:
        """Put the global model and the aggregator state back as they were before this round."""
        arrays, state = self.committed
        self.current = {k: v.copy() for k, v in arrays.items()}
        load_aggregator_state(self.aggregator, state)

    def _took_part(self, records: list[SiteReply], kind: str) -> list[SiteReply]:
        """The replies that count towards ``required_replies`` (the sites that took part in the round).

        In time, from the node bound to the site, and ``trained`` (even if the
        server's checks then rejected the update: the robust rule exists to
        outvote it) or ``skipped`` by the site's own plan or budget; for
        evaluation, ``evaluated``. Missing, failed, refused and
        identity-rejected replies do not count.
        """
        if kind != "training":
            return [r for r in records if r.status == "evaluated"]
        bound = self.identities.nodes
        return [
            r
            for r in records
            if r.status in ("trained", "skipped") or (r.status == "rejected" and bound.get(r.site) == r.node)
        ]

    def _fail(self, server_round: int, kind: str, records: list[SiteReply], why: str = "") -> None:
        """Mark ``server_round`` failed: too few ``kind`` replies took part; say which sites were missing and why."""
        counted = {id(r) for r in self._took_part(records, kind)}
        count = len(counted)
        unusable = [r for r in records if id(r) not in counted]
        unnamed = {r.node for r in records if r.node is not None and r.node not in self.identities.sites}
        absent = self.num_sites - len(self.identities.nodes) - len(unnamed)  # sites the server never heard of
        parts = [f"{r.site} {r.status} ({r.reason})" for r in unusable]
        if absent > 0:
            parts.append(f"{absent} site(s) not connected")
        reason = f"{count} of {self.required_replies} required {kind} replies{': ' + '; '.join(parts) if parts else ''}"
        reason = f"{why}; {reason}" if why else reason
        earlier = self.round_failures.get(server_round)
        self.round_failures[server_round] = f"{earlier}; {reason}" if earlier else reason
        self.round_unusable[server_round] = sorted(
            set(self.round_unusable.get(server_round, [])) | {r.site for r in unusable}
        )
        log(WARNING, "fedcl: round %s failed: %s; the global model stays as it was", server_round, reason)
