"""Timings read from the pilot's timed logs: the ServerApp's round lines and each SuperNode's message lines.

The ServerApp's own ``fedcl: round N/M ... done in X s`` gives each round's
duration. Its log reaches the coordinator through ``flwr log --stream`` in
batches, seconds late, so *when* things happened is read from the SuperNodes'
output instead (read live by the pilot, each line timed on arrival): Flower
prints ``Receiving: <kind> message``, ``Start `flwr-clientapp` process`` and
``Sent successfully`` for every message a site handles.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ROUND_DONE = re.compile(r"fedcl: round (\d+)/(\d+) .*?done in ([0-9.]+) s(?: \(server ([0-9.]+) s\))?")
RECEIVING = re.compile(r"Receiving: (\w+) message")
APP_START = re.compile(r"Start `flwr-clientapp` process")
SENT = re.compile(r"Sent successfully")


@dataclass(frozen=True)
class RoundTiming:
    """One round: its number, when its end line reached the follower (``time.time()``), its own duration.

    ``server_seconds``: the part of it the server itself worked, when the line says so.
    """

    round: int
    ended_at: float
    seconds: float
    server_seconds: float | None = None


@dataclass(frozen=True)
class MessageSpan:
    """One message a site handled: its kind, when it arrived, when its app process started, when the reply left."""

    kind: str
    received_at: float
    app_started_at: float | None
    sent_at: float | None

    @property
    def seconds(self) -> float | None:
        """Arrival to reply sent."""
        return None if self.sent_at is None else self.sent_at - self.received_at


def round_timings(lines: Iterable[tuple[float, str]]) -> list[RoundTiming]:
    """The rounds whose end the ServerApp logged, in order (duplicates of a round number keep the first)."""
    timings: dict[int, RoundTiming] = {}
    for arrived, line in lines:
        match = ROUND_DONE.search(line)
        if match and int(match.group(1)) not in timings:
            server = float(match.group(4)) if match.group(4) else None
            timings[int(match.group(1))] = RoundTiming(int(match.group(1)), arrived, float(match.group(3)), server)
    return [timings[number] for number in sorted(timings)]


def message_spans(lines: Iterable[tuple[float, str]]) -> list[MessageSpan]:
    """The messages in one SuperNode's timed output, in order (one at a time: a SuperNode runs them in turn)."""
    spans: list[MessageSpan] = []
    current: dict | None = None
    for arrived, line in lines:
        received = RECEIVING.search(line)
        if received:
            if current is not None:
                spans.append(MessageSpan(**current))
            current = {"kind": received.group(1), "received_at": arrived, "app_started_at": None, "sent_at": None}
        elif current is not None and APP_START.search(line) and current["app_started_at"] is None:
            current["app_started_at"] = arrived
        elif current is not None and SENT.search(line) and current["sent_at"] is None:
            current["sent_at"] = arrived
    if current is not None:
        spans.append(MessageSpan(**current))
    return spans


def round_ends(sites: Iterable[list[MessageSpan]], closing_kind: str = "evaluate") -> list[float]:
    """When each round ended: the k-th round ends when the last site sent its k-th ``closing_kind`` reply.

    A fedcl round sends every site a train then an evaluate message; the
    server's aggregation after the last reply takes milliseconds.
    """
    per_site = [[span.sent_at for span in spans if span.kind == closing_kind and span.sent_at] for spans in sites]
    rounds = min((len(times) for times in per_site), default=0)
    return [max(times[k] for times in per_site) for k in range(rounds)]
