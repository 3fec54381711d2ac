"""A scripted Flower Grid and hand-made site replies, for server tests without Flower processes.

``ScriptedGrid`` answers ``get_node_ids`` and ``send_and_receive`` as Flower's
grids do: each connected node's reply comes from a function of the message
it was sent (``None``: the reply missed the round timeout, which Flower
drops silently). Replies are real ``Message`` objects built with
``reply_to``, as Flower's own strategy tests build them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedcl.protocol import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, SITE_RECORD, to_numpy, to_record

Answer = Callable[[Message], Message | None]


class ScriptedGrid:
    """Just enough of a Grid: connected node ids and a scripted answer per node."""

    def __init__(self, answers: dict[int, Answer], connected: Iterable[int] | None = None) -> None:
        self.answers = dict(answers)
        self.connected = set(answers if connected is None else connected)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.connected)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            answer = self.answers.get(message.metadata.dst_node_id)
            reply = answer(message) if answer is not None else None
            if reply is not None:
                replies.append(reply)
        return replies


def server_round(message: Message) -> int:
    """The ``server-round`` a message carries."""
    return int(message.content[CONFIG_RECORD]["server-round"])


def train_reply(
    instruction: Message, site: str, arrays: dict | None, examples: int = 10, status: str = "trained", reason: str = ""
) -> Message:
    """A site's training reply: its record (name, status, reason), metrics and, if given, arrays."""
    content = RecordDict(
        {
            METRICS_RECORD: MetricRecord({"num-examples": examples}),
            SITE_RECORD: ConfigRecord({"site": site, "status": status, "reason": reason}),
        }
    )
    if arrays is not None:
        content[ARRAYS_RECORD] = to_record(arrays)
    return Message(content=content, reply_to=instruction)


def evaluate_reply(instruction: Message, site: str, accuracy: float, examples: int = 10) -> Message:
    """A site's evaluation reply."""
    content = RecordDict(
        {
            METRICS_RECORD: MetricRecord({"num-examples": examples, "accuracy": accuracy}),
            SITE_RECORD: ConfigRecord({"site": site, "status": "evaluated", "reason": ""}),
        }
    )
    return Message(content=content, reply_to=instruction)


def site_update(site_index: int, round_number: int, received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A deterministic 'training' result: what the site received (zeros in round 1) plus a site- and round-specific step."""
    base = received.get("w", np.zeros(4, np.float32))
    step = np.array([site_index + 1, -1.0, 0.5 * round_number, 0.25], np.float32) * 0.1
    return {"w": (base + step).astype(np.float32)}


def scripted_site(
    name: str,
    index: int,
    silent_from: int | None = None,
    skip: bool = False,
    seen: list[int] | None = None,
) -> Answer:
    """A site that trains with :func:`site_update` and evaluates with accuracy 0.5 + 0.1 * index.

    ``silent_from``: from this server round on it never replies (lost).
    ``skip``: it answers every training round with ``skipped``.
    ``seen``: collects the server rounds of the training messages it receives.
    """

    def answer(message: Message) -> Message | None:
        current = server_round(message)
        if silent_from is not None and current >= silent_from:
            return None
        if message.metadata.message_type == MessageType.EVALUATE:
            return evaluate_reply(message, name, 0.5 + 0.1 * index)
        if seen is not None:
            seen.append(current)
        if skip:
            return train_reply(message, name, None, status="skipped", reason="privacy budget: spent")
        received = to_numpy(message.content[ARRAYS_RECORD])
        return train_reply(message, name, site_update(index, current, received))

    return answer
