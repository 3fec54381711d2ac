"""The server's side of a secure round: stages 1 and 2 before the train messages, stage 4 after the replies.

:class:`SecureRounds` drives ``fedcl.secure_aggregation.SecureSumServer``
through Flower's grid (``grid.send_and_receive``, bounded by the round
timeout), for :class:`~strategies.site_strategy.SiteStrategy`:

1. :meth:`SecureRounds.open` (from ``configure_train``): every connected site
   is asked for its public keys (``train.secagg_keys``), then the sites that
   answered for their encrypted shares (``train.secagg_shares``) under the
   threshold ``t = floor(n / 2) + 1`` of the ``n`` that advertised; returns
   each step-2 site's mask request, which rides in its train message;
2. :meth:`SecureRounds.finish` (from ``aggregate_train``): the masked words of
   the sites that replied are collected, the survivors are asked for their
   shares (``train.secagg_unmask``), the sum is unmasked and centred, and its
   release object (``strategies/secure_releases.py``) decodes it into one
   update: the ncm class sums, or the weighted mean of the probe or LoRA
   tensors; the sites' sum, never a site's own.

A round continues with the sites left at any stage while at least
``max(t, n_h + c)`` remain (``n_h`` = ``secagg-min-honest``, ``c`` =
``secagg-max-colluders``, ``t`` the protocol server's threshold); otherwise it
fails (:class:`SecureRoundError`, also for any request the protocol server
refuses) and changes nothing. No per-site count is asked for or used (a
probe or LoRA round's weights travel inside the masked sum). numpy only (no
torch).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedcl.protocol import (
    CONFIG_RECORD,
    REASON,
    SECAGG_KEYS,
    SECAGG_RECORD,
    SECAGG_SHARES,
    SECAGG_UNMASK,
    SERVER_ROUND,
    SITE_RECORD,
    STATUS,
)
from fedcl.secure_aggregation import EncryptedShares, PublicKeys, SecureSumServer, UnmaskReply
from fedcl.secure_ncm import threshold
from fedcl.secure_quantization import from_modular
from strategies.secure_releases import ClassSumRelease, SecureRelease


class SecureRoundError(ValueError):
    """A secure round that cannot complete (too few sites left at some stage); the text says which and why."""


@dataclass(frozen=True)
class SecureSum:
    """What a finished round gives the strategy: the decoded update and the releases left out of the sum."""

    update: dict[str, np.ndarray]
    left_out: dict[int, str]  # node -> why its masked release is not in the sum


@dataclass
class SecureSession:
    """One round's protocol server and what became of each site before the train messages."""

    server: SecureSumServer | None = None
    requests: dict[int, dict] = field(default_factory=dict)  # step-2 node -> its MaskRequest (ConfigRecord values)
    dropped: dict[int, str] = field(default_factory=dict)  # node -> why it left in stage 1 or 2
    failure: str = ""  # why the round cannot go on, or ""


class SecureRounds:
    """Stages 1, 2 and 4 of every secure round: ``n_h + c`` sites required, ``bits``-bit words.

    ``honest_sites`` n_h (>= 1) and ``colluders`` c (>= 0): a sum is unmasked
    only with at least ``n_h + c`` survivors, so at least ``n_h`` honest
    shares are in it even if ``c`` survivors collude with the server.
    """

    def __init__(
        self,
        honest_sites: int,
        bits: int,
        timeout: float,
        colluders: int = 0,
        max_sites: int | None = None,
        release: SecureRelease | None = None,
    ) -> None:
        """``bits``: the word width for a round of at most ``max_sites`` sites (None: no cap on the nodes asked).

        ``release``: what the masked replies hold (``strategies/secure_releases.py``;
        default the ncm class sums).

        A round asks at most ``max_sites`` nodes (the lowest ids) for keys, so
        the sum never holds more releases than ``bits`` was computed for
        (``fedcl.secure_ncm.server_bits`` with ``num-sites``).
        """
        if max_sites is not None and max_sites < 2:
            raise ValueError(f"max_sites = {max_sites}: use the run's num-sites (>= 2) or None")
        if honest_sites < 1:
            raise ValueError(f"honest_sites = {honest_sites}: use the run's secagg-min-honest (>= 1)")
        if colluders < 0:
            raise ValueError(f"colluders = {colluders}: use the run's secagg-max-colluders (>= 0)")
        self.honest_sites, self.bits, self.timeout = int(honest_sites), int(bits), float(timeout)
        self.colluders = int(colluders)
        self.max_sites = None if max_sites is None else int(max_sites)
        self.sessions: dict[int, SecureSession] = {}
        self.release: SecureRelease = release or ClassSumRelease()
        self.exchanged: dict[int, dict[int, list[int]]] = {}  # round -> node -> [bytes down, bytes up] (protocol)
        self.waited_seconds = 0.0  # spent waiting for the sites' stage answers, all rounds (the server's clock)

    @property
    def survivors_needed(self) -> int:
        """``n_h + c``: the fewest sites any stage of a round may go on with, whatever the threshold."""
        return self.honest_sites + self.colluders

    def required(self, server: SecureSumServer) -> int:
        """The fewest sites the round of ``server`` may go on with: ``max(server.threshold, n_h + c)``."""
        return max(server.threshold, self.survivors_needed)

    def open(self, grid: Grid, server_round: int, nodes: list[int], entries: Mapping) -> SecureSession:
        """Stages 1 and 2 with ``nodes``; the session holds each step-2 node's mask request, or the failure."""
        session = SecureSession()
        self.sessions[server_round] = session
        if self.max_sites is not None and len(nodes) > self.max_sites:
            extra = sorted(nodes)[self.max_sites :]
            nodes = sorted(nodes)[: self.max_sites]
            session.dropped.update(
                {
                    n: f"more nodes connected than num-sites = {self.max_sites}: the word width holds that many"
                    for n in extra
                }
            )
            log(WARNING, "round %s: secure aggregation: %d nodes over num-sites left out", server_round, len(extra))
        keys = self._ask(grid, server_round, nodes, SECAGG_KEYS, lambda node: {}, entries, session)
        advertised = {node: PublicKeys.from_dict(answer) for node, answer in keys.items() if _parses(answer, "keys")}
        session.dropped.update({n: "its public keys did not parse" for n in keys if n not in advertised})
        if len(advertised) < max(self.survivors_needed, 2):
            needed = max(self.survivors_needed, 2)
            return self._failed(session, f"{len(advertised)} sites advertised keys, the round needs {needed}")
        server = SecureSumServer(threshold(len(advertised)), self.bits)
        for node, public in advertised.items():
            try:
                server.add_public_keys(node, public)
            except ValueError as err:
                session.dropped[node] = f"its keys were refused: {err}"
        try:
            request = server.share_keys_request().to_dict()
        except ValueError as err:
            return self._failed(session, str(err))
        needed = self.required(server)
        shares = self._ask(
            grid, server_round, sorted(server.public_keys), SECAGG_SHARES, lambda n: request, entries, session
        )
        for node, answer in shares.items():
            try:
                server.add_encrypted_shares(node, EncryptedShares.from_dict(answer))
            except ValueError as err:
                session.dropped[node] = f"its shares were refused: {err}"
        if len(server.ciphertexts) < needed:
            return self._failed(
                session, f"{len(server.ciphertexts)} sites completed the key sharing, the round needs {needed}"
            )
        try:
            session.requests = {node: server.mask_request(node).to_dict() for node in sorted(server.ciphertexts)}
        except ValueError as err:
            return self._failed(session, str(err))
        session.server = server
        log(
            INFO,
            "round %s: secure aggregation: %d sites shared keys (threshold %d)",
            server_round,
            len(session.requests),
            server.threshold,
        )
        return session

    def finish(
        self,
        grid: Grid,
        server_round: int,
        releases: Mapping[int, Mapping[str, np.ndarray]],
        entries: Mapping,
        current: Mapping[str, np.ndarray] | None = None,
    ) -> SecureSum:
        """Stage 4: the update the sum of the sites whose ``releases`` arrived decodes to (:attr:`release`), and who
        was left out.

        ``releases``: node -> the arrays of its trained reply (the ncm
        release's ``masked-sums`` and ``noise-variance``, or a probe or LoRA
        round's masked words); a malformed one, or one of another layout
        than the first, is left out. ``current``: the global arrays the round
        started from (a probe or LoRA round's sum moves them). Raises :class:`SecureRoundError` when
        fewer than ``max(t, n_h + c)`` sites are left, or the sum cannot be
        unmasked.
        """
        session = self.sessions.pop(server_round, None)
        if session is None or session.server is None:
            raise SecureRoundError(session.failure if session else "the round's key stages did not run")
        server, layout, accepted, left_out = session.server, None, {}, {}
        for node, arrays in sorted(releases.items()):
            try:
                found = self.release.layout(arrays)
                if layout is not None and found != layout:
                    raise ValueError("its layout differs from the other sites'")
                server.add_masked_vector(node, self.release.words(arrays, found))
            except ValueError as err:
                log(WARNING, "round %s: secure aggregation: node %s's release left out: %s", server_round, node, err)
                left_out[node] = f"its masked release was left out of the secure sum: {err}"
                continue
            layout, accepted[node] = found, arrays
        needed = self.required(server)
        if len(server.masked) < needed or layout is None:
            raise SecureRoundError(f"{len(server.masked)} masked releases arrived, the round needs {needed}")
        try:
            request = server.unmask_request().to_dict()
        except ValueError as err:
            raise SecureRoundError(f"the unmask request was refused: {err}") from None
        answers = self._ask(grid, server_round, list(server.survivors), SECAGG_UNMASK, lambda n: request, entries, None)
        replies = {node: UnmaskReply.from_dict(a) for node, a in answers.items() if _parses(a, "unmask")}
        try:
            total = server.unmask(replies)
            update = self.release.decode(
                from_modular(total, server.bits),
                layout,
                {node: accepted[node] for node in server.survivors},
                current or {},
            )
        except ValueError as err:
            raise SecureRoundError(f"the sum could not be unmasked ({len(replies)} share replies): {err}") from None
        log(INFO, "round %s: secure aggregation: the sum of %d sites unmasked", server_round, len(server.survivors))
        return SecureSum(update, left_out)

    def count_bytes(self, server_round: int, node: int, down: int = 0, up: int = 0) -> None:
        """Add a protocol record's bytes (ConfigRecord.count_bytes: keys, shares, requests) to ``node``'s tally."""
        tally = self.exchanged.setdefault(server_round, {}).setdefault(int(node), [0, 0])
        tally[0] += int(down)
        tally[1] += int(up)

    def exchanged_bytes(self, server_round: int) -> dict[int, tuple[int, int]]:
        """node -> (bytes down, bytes up) of the round's protocol records so far; forgets the round."""
        return {node: (down, up) for node, (down, up) in self.exchanged.pop(server_round, {}).items()}

    def _failed(self, session: SecureSession, reason: str) -> SecureSession:
        session.failure = (
            f"secure aggregation: {reason} (max(threshold, secagg-min-honest + secagg-max-colluders = "
            f"{self.honest_sites} + {self.colluders}))"
        )
        log(WARNING, "%s", session.failure)
        return session

    def _ask(self, grid: Grid, server_round: int, nodes: list[int], action: str, request, entries: Mapping, session):
        """Send ``action`` to ``nodes``; node -> its answer's SECAGG record for the sites that answered in time."""
        messages = []
        for node in nodes:
            asked = ConfigRecord(request(node))
            self.count_bytes(server_round, node, down=record_bytes(asked))
            messages.append(
                Message(
                    content=RecordDict(
                        {
                            CONFIG_RECORD: ConfigRecord({**dict(entries), SERVER_ROUND: server_round}),
                            SECAGG_RECORD: asked,
                        }
                    ),
                    message_type=f"{MessageType.TRAIN}.{action}",
                    dst_node_id=node,
                    ttl=self.timeout,
                )
            )
        answers: dict[int, dict] = {}
        started = time.perf_counter()
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        self.waited_seconds += time.perf_counter() - started
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error() or not reply.has_content():
                reason = reply.error.reason if reply.has_error() else "an empty reply"
            else:
                info = dict(reply.content.config_records.get(SITE_RECORD, ConfigRecord()))
                if info.get(STATUS) == "answered" and SECAGG_RECORD in reply.content.config_records:
                    answer = reply.content.config_records[SECAGG_RECORD]
                    self.count_bytes(server_round, node, up=record_bytes(answer))
                    answers[node] = dict(answer)
                    continue
                reason = str(info.get(REASON, "")) or "no answer"
            log(WARNING, "round %s: secure aggregation %s: node %s left: %s", server_round, action, node, reason)
            if session is not None:
                session.dropped[node] = reason
        for node in set(nodes) - set(answers):
            if session is not None:
                session.dropped.setdefault(node, f"no {action} answer within the round timeout")
        return answers


def record_bytes(record: Mapping) -> int:
    """The bytes of a ConfigRecord's keys and values, counted as ``ConfigRecord.count_bytes`` counts them.

    Our own copy of the rule because Flower 1.42's ``count_bytes`` raises on
    an empty list or an empty string (an unmask request with no dropped site
    holds one): a key counts its length, a str or bytes value its length (0
    when empty), a bool 1, an int or float 8, a list the sum of its items.
    """

    def value_bytes(value) -> int:
        if isinstance(value, list):
            return sum(value_bytes(item) for item in value)
        if isinstance(value, str | bytes):
            return len(value)
        return 1 if isinstance(value, bool) else 8

    return sum(len(key) + value_bytes(value) for key, value in record.items())


def _parses(answer: Mapping, kind: str) -> bool:
    """True when ``answer`` is a well-formed stage answer of ``kind`` ("keys" or "unmask")."""
    try:
        (PublicKeys if kind == "keys" else UnmaskReply).from_dict(answer)
    except ValueError:
        return False
    return True
