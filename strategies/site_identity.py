"""Which node speaks for which site: a site name is bound to the node id that first claimed it.

Every reply names its site (``fedcl.protocol.SITE_NAME`` in the site record).
The server binds node id -> site name at the first claim and then holds the
node to it:

- a node claiming a name bound to another node that is still connected (in
  ``grid.get_node_ids()``) is refused, and so is the second of two nodes
  claiming one name in the same round (and kind: train or evaluate);
- when the earlier node is gone, the name re-binds to the new node (a
  SuperNode restarted without node authentication registers afresh and gets
  a new node id; an authenticated one keeps the id bound to its key);
- a node that claims a second name while still bound to its first is refused;
- with the registered nodes given (run config ``site-nodes``: the node id
  Flower gave each site's authenticated key at registration), a name is
  accepted only from its registered node, and a name not registered is
  refused: the binding then rests on the site's key, not on who claimed first.

The bindings are part of the server's checkpoint (:meth:`state`/:meth:`restore`).
No Flower or torch here: node ids are plain ints.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.common.logger import log


@dataclass(frozen=True)
class Claim:
    """The verdict on one reply's claim: the name it is recorded under and, if refused, why."""

    site: str  # the bound name, or ``node-<id>`` for a refused or nameless claim
    refused: str = ""  # empty when the claim is accepted


def node_label(node: int) -> str:
    """How a node with no accepted name is named in the run report."""
    return f"node-{node}"


class SiteIdentities:
    """The node -> site bindings of one run (see the module docstring)."""

    def __init__(self, registered: Mapping[str, int] | None = None) -> None:
        self.registered = dict(registered or {})  # site name -> the node id of its registered key (may be empty)
        self.sites: dict[int, str] = {}  # node id -> site name
        self.nodes: dict[str, int] = {}  # site name -> node id (the inverse)
        self.round_claims: dict[str, int] = {}  # site name -> node id, claims of the current round and kind

    def begin_round(self) -> None:
        """Forget the claims of the previous round (two claims of one name in one round: the second is refused)."""
        self.round_claims = {}

    def name_of(self, node: int) -> str:
        """The site name bound to ``node``, or ``node-<id>`` when it has none."""
        return self.sites.get(node, node_label(node))

    def claim(self, node: int, name: str, connected: Collection[int]) -> Claim:
        """Check ``node``'s claim to be site ``name``; bind or re-bind it when allowed.

        ``connected`` is the set of node ids the grid reports now. Returns the
        :class:`Claim`: accepted (recorded under ``name``) or refused with a
        reason naming both node ids.
        """
        if not name:
            return Claim(node_label(node), f"node {node} sent a reply that names no site (the site record's 'site')")
        if self.registered and self.registered.get(name) != node:
            owner = self.registered.get(name)
            why = f"registered to node {owner}" if owner is not None else "not among the registered sites (site-nodes)"
            return Claim(node_label(node), f"node {node} claims site {name!r}, which is {why}")
        bound_name = self.sites.get(node)
        if bound_name is not None and bound_name != name:
            return Claim(
                node_label(node),
                f"node {node} is bound to site {bound_name!r} and now claims {name!r}: a node speaks for one site",
            )
        holder = self.round_claims.get(name)
        if holder is not None and holder != node:
            return Claim(
                node_label(node),
                f"node {node} claims site {name!r}, which node {holder} already claimed in this round",
            )
        earlier = self.nodes.get(name)
        if earlier is not None and earlier != node:
            if earlier in connected:
                return Claim(
                    node_label(node),
                    f"node {node} claims site {name!r}, which is bound to node {earlier}, still connected",
                )
            log(INFO, "fedcl: site %r re-bound from node %d (gone) to node %d", name, earlier, node)
            del self.sites[earlier]
        elif earlier is None:
            log(INFO, "fedcl: site %r bound to node %d", name, node)
        self.sites[node] = name
        self.nodes[name] = node
        self.round_claims[name] = node
        return Claim(name)

    def state(self) -> dict[str, Any]:
        """The bindings as JSON-ready data: ``{"sites": {"<node id>": name}}``."""
        return {"sites": {str(node): name for node, name in sorted(self.sites.items())}}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned (replaces every binding)."""
        self.sites = {int(node): str(name) for node, name in dict(state.get("sites", {})).items()}
        self.nodes = {name: node for node, name in self.sites.items()}
        self.round_claims = {}
