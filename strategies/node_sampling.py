"""Node sampling that never stalls: wait a bounded time for enough nodes, then go on with whoever is connected.

Flower's ``sample_nodes`` (``flwr/serverapp/strategy/strategy_utils.py``)
loops until ``min_available_nodes`` are connected, with no limit: one lost
site stalls the run for ever. :func:`wait_for_nodes` waits at most
``timeout`` seconds for ``required`` nodes and then returns the nodes
connected at that moment, however few; the round decides whether their
replies are enough.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Protocol

from flwr.common.logger import log


class NodeSource(Protocol):
    """What sampling needs of a Flower ``Grid``: the ids of the nodes connected now."""

    def get_node_ids(self) -> Iterable[int]:
        """The connected node ids."""
        ...


def wait_for_nodes(
    grid: NodeSource,
    required: int,
    timeout: float,
    poll_seconds: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """The connected node ids (sorted) once ``required`` are connected, or after ``timeout`` seconds with fewer.

    Polls ``grid.get_node_ids()`` every ``poll_seconds`` (never sleeping past
    the deadline). ``timeout`` must be positive; ``required`` at least 1.
    """
    if timeout <= 0 or required < 1:
        raise ValueError(
            f"wait_for_nodes(required={required}, timeout={timeout}): "
            "use required >= 1 and a positive timeout (round-timeout)"
        )
    deadline = clock() + timeout
    logged = False
    while True:
        nodes = sorted(int(node) for node in grid.get_node_ids())
        left = deadline - clock()
        if len(nodes) >= required:
            return nodes
        if left <= 0:
            log(
                WARNING,
                "fedcl: %d of %d required nodes connected after %.0f s (round-timeout): the round goes on with them",
                len(nodes),
                required,
                timeout,
            )
            return nodes
        if not logged:
            log(INFO, "fedcl: waiting up to %.0f s for nodes: %d of %d connected", left, len(nodes), required)
            logged = True
        sleep(min(poll_seconds, left))
