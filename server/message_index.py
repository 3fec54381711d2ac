"""Pending messages indexed by destination site, for Flower's simulation engine.

Flower 1.42's simulation engine (``vce_api.add_messages_to_queue``) asks the
in-memory link state for each virtual site's next message, every site every
0.1 s. ``InMemoryLinkState.get_message_ins`` answers each such ask by walking
every stored message (delivered or not, for any site) and checking each one's
expiry and federation, under the state's lock. A sweep over N sites with N
messages in flight is then N² checks; at 1,000 sites one sweep took longer
than a round's training and a round did not finish in 10 minutes (measured,
README "Many sites"). Flower has no index to switch on (its PR #4961 proposed
one and was closed), so this module adds one: :class:`IndexedLinkState` is
Flower's own class with the messages not yet delivered kept per destination,
and every other method, check and lock is Flower's.

The index only chooses which stored messages a site's ask looks at: each one
still goes through Flower's ``_check_stored_messages`` before it is handed
out, so expiry and federation checks are unchanged; a message of another
site is checked when that site asks (every 0.1 s) and when the server pulls
replies, instead of on every site's ask.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import Message
from flwr.common.logger import log
from flwr.server.superlink.linkstate import InMemoryLinkState
from flwr.supercore.date import now  # Flower's own clock for delivered_at, as its get_message_ins uses


class IndexedLinkState(InMemoryLinkState):
    """Flower's ``InMemoryLinkState`` whose ``get_message_ins`` looks only at the asking site's pending messages."""

    pending_by_node: dict[int, dict[str, None]]  # node id -> ids not yet delivered, in arrival order

    def store_message_ins(self, message: Message) -> str | None:
        """Flower's ``store_message_ins``; a stored message is also indexed under its destination."""
        with self.lock:
            message_id = super().store_message_ins(message)
            if message_id is not None:
                self.pending_by_node.setdefault(message.metadata.dst_node_id, {})[message_id] = None
            return message_id

    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Message]:
        """The site's messages not yet delivered (at most ``limit``), now marked delivered: Flower's contract.

        Each candidate passes Flower's own expiry and federation check first;
        the ones that fail it are deleted by that check, as in Flower.
        """
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found: list[Message] = []
        with self.lock:
            pending = self.pending_by_node.get(node_id)
            if not pending:
                return found
            for message_id in list(pending):
                self._check_stored_messages({message_id})
                message = self.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "":
                    del pending[message_id]  # expired, deleted, or handed out by another path
                    continue
                if run_id is not None and message.metadata.run_id != run_id:
                    continue
                found.append(message)
                del pending[message_id]
                if limit and len(found) == limit:
                    break
            delivered_at = now().isoformat()
            for message in found:
                message.metadata.delivered_at = delivered_at
        return found


def index_pending_messages(state: object) -> bool:
    """Make a live Flower ``InMemoryLinkState`` an :class:`IndexedLinkState`; True if it was changed.

    Anything else (a deployment's gRPC grid has no state here, a SQL state,
    a subclass of Flower's) is left as it is and False is returned. The
    messages already stored and not yet delivered are indexed, so it is safe
    at any point of a run; the ServerApp calls it before its first round.
    """
    if type(state) is not InMemoryLinkState:  # exactly Flower's class: a subclass may rely on its own methods
        return False
    with state.lock:
        pending: dict[int, dict[str, None]] = {}
        for message_id, message in state.message_ins_store.items():
            if message.metadata.delivered_at == "":
                pending.setdefault(message.metadata.dst_node_id, {})[message_id] = None
        # Same fields, one method more: swapping the class keeps the state object that the
        # engine and the grid already hold (neither offers a hook to pass another one).
        state.__class__ = IndexedLinkState
        state.pending_by_node = pending  # type: ignore[attr-defined]
    log(INFO, "fedcl: simulation link state indexes pending messages by site")
    return True
