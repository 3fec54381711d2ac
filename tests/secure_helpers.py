"""Shared by the secure-aggregation tests: the ClientApp's own handlers answering a scripted grid, which records."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fake_grid import ScriptedGrid
from flwr.app import Message, MessageType
from site_helpers import site_context

NODES = (11, 12, 13)


class RecordingGrid(ScriptedGrid):
    """A scripted grid that keeps every reply the server received (the server's whole view), as well as ``sent``."""

    def __init__(self, answers, connected=None) -> None:
        super().__init__(answers, connected)
        self.received: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.received.extend(replies)
        return replies


def site_answers(
    flat: dict,
    tmp_path: Path,
    captured: Any = None,
    drop_train: int | None = None,
    per_site: Mapping[int, Mapping[str, Any]] | None = None,
    **policy: Any,
):
    """Per node of :data:`NODES`, an answer that runs the ClientApp's own handler for the message's type.

    ``captured.node`` (when given) is set to the answering node first;
    ``drop_train``: that node's train reply is lost (it masked and spent);
    ``per_site``: node -> extra node-config keys of that site only.
    """
    from client.app import evaluate_global, secagg_keys, secagg_shares, secagg_unmask, train

    handlers = {
        MessageType.TRAIN: train,
        MessageType.EVALUATE: evaluate_global,
        f"{MessageType.TRAIN}.secagg_keys": secagg_keys,
        f"{MessageType.TRAIN}.secagg_shares": secagg_shares,
        f"{MessageType.TRAIN}.secagg_unmask": secagg_unmask,
    }
    contexts = {
        node: site_context(
            flat, tmp_path / f"site-{i}", partition=i, node_id=node, **{**policy, **(per_site or {}).get(node, {})}
        )
        for i, node in enumerate(NODES)
    }

    def answer_for(node):
        def answer(message):
            if captured is not None:
                captured.node = node
            reply = handlers[message.metadata.message_type](message, contexts[node])
            if drop_train == node and message.metadata.message_type == MessageType.TRAIN:
                return None  # it masked and spent, but its words never arrive
            return reply

        return answer

    return {node: answer_for(node) for node in NODES}, contexts
