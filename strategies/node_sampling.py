"""Node sampling that never stalls: wait a bounded time for enough nodes, then go on with whoever is connected.

Flower's ``sample_nodes`` (``flwr/serverapp/strategy/strategy_utils.py``)
loops until ``min_available_nodes`` are connected, with no limit: one lost
site stalls the run for ever. :func:`wait_for_nodes` waits at most
``timeout`` seconds for ``required`` nodes and then returns the nodes
connected at that moment, however few; the round decides whether their
replies are enough.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class EvaluationSampling:
    """Which connected sites evaluate the global model in a round (run config ``eval-fraction``).

    A round evaluates ``ceil(fraction * connected)`` sites (at least one),
    drawn from the public ``seed`` and the round number, so the server's
    choice depends on no site's data; rounds where ``every_site(round)`` is
    true (the run's last round, a continual run's last round of each
    experience) evaluate every connected site. With 1,000 sites a fraction of
    0.05 costs 50 evaluations a round instead of 1,000.
    """

    fraction: float = 1.0
    seed: int = 0
    every_site: Callable[[int], bool] = field(default=lambda server_round: False)

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"eval-fraction = {self.fraction!r}: use a share in (0, 1], e.g. 0.1; 1 evaluates all")

    def chosen(self, server_round: int, nodes: list[int]) -> list[int]:
        """The nodes (sorted) that evaluate in ``server_round``."""
        if self.fraction >= 1 or self.every_site(server_round) or not nodes:
            return sorted(nodes)
        count = max(1, math.ceil(self.fraction * len(nodes)))
        return sorted(random.Random(self.seed * 1_000_003 + server_round).sample(sorted(nodes), count))
