"""The indexed link state hands out exactly what Flower's own does, with checks linear in sites per sweep.

Reference: Flower 1.42's ``InMemoryLinkState`` driven by the same script
(the engine's sweep: every site asks for one message), side by side.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import HEARTBEAT_INTERVAL_INF
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server.message_index import IndexedLinkState, index_pending_messages

RUN_ID = 1


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages take their run and source from the process's identity: here the ServerApp's (SuperLink node 1)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", RUN_ID), ("_task_id", 11), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def simulation_state(sites: int) -> tuple[InMemoryLinkState, InMemoryGrid, list[int]]:
    """A link state set up as Flower's ``run_simulation`` sets it up: a pre-registered run, N registered sites."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(RUN_ID)
    run.primary_task_id = 11
    run.federation_id = NOOP_FEDERATION_ID  # what a simulation's run carries
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=RUN_ID)
    nodes = []
    for _ in range(sites):
        node_id = state.create_node(
            "owner", "account", secrets.token_bytes(32), heartbeat_interval=HEARTBEAT_INTERVAL_INF
        )
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def message(node_id: int, tag: str, ttl: float | None = None) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"tag": tag})}), node_id, "train", ttl=ttl, group_id="1")


def sweep(state: InMemoryLinkState, nodes: list[int]) -> list[tuple[int, str]]:
    """One pass of the engine's loop (``vce_api.add_messages_to_queue``): each site asks for one message."""
    handed: list[tuple[int, str]] = []
    for node_id in nodes:
        for msg in state.get_message_ins(node_id=node_id, limit=1):
            handed.append((node_id, str(msg.content["c"]["tag"])))
    return handed


def count_checks(state: InMemoryLinkState) -> dict[str, int]:
    counter = {"checked": 0}
    original = state._check_stored_messages  # pylint: disable=protected-access

    def counting(message_ids: set[str], run_id: Any = None) -> None:
        counter["checked"] += len(message_ids)
        original(message_ids, run_id)

    state._check_stored_messages = counting  # type: ignore[method-assign]  # pylint: disable=protected-access
    return counter


def scripted(indexed: bool) -> tuple[list[list[tuple[int, str]]], list[str]]:
    """Pushes (two messages to one site, one already expired), sweeps, a pull; what each sweep handed out."""
    state, grid, nodes = simulation_state(4)
    if indexed:
        assert index_pending_messages(state)
    sweeps = []
    ids = list(grid.push_messages([message(nodes[0], "a1"), message(nodes[0], "a2"), message(nodes[2], "c1")]))
    sweeps.append(sweep(state, nodes))
    sweeps.append(sweep(state, nodes))
    sweeps.append(sweep(state, nodes))  # nothing left
    expired = list(grid.push_messages([message(nodes[1], "b-expired", ttl=0.05)]))
    ids += list(grid.push_messages([message(nodes[3], "d1")]))
    time.sleep(0.1)
    sweeps.append(sweep(state, nodes))
    replies = [m.metadata.message_id for m in grid.pull_messages(ids + expired) if m.has_error()]
    return sweeps, replies


def test_indexed_state_hands_out_what_flowers_own_does() -> None:
    flower_sweeps, flower_errors = scripted(indexed=False)
    indexed_sweeps, indexed_errors = scripted(indexed=True)
    assert flower_sweeps == [
        [(flower_sweeps[0][0][0], "a1"), (flower_sweeps[0][1][0], "c1")],
        [(flower_sweeps[0][0][0], "a2")],
        [],
        [(flower_sweeps[3][0][0], "d1")],
    ]
    assert [[tag for _, tag in s] for s in indexed_sweeps] == [[tag for _, tag in s] for s in flower_sweeps]
    assert len(indexed_errors) == len(flower_errors) == 1  # the expired message, answered with an error by both


def test_a_sweep_checks_each_pending_message_once_not_once_per_site() -> None:
    sites = 200
    for indexed, most in ((False, None), (True, sites)):
        state, grid, nodes = simulation_state(sites)
        if indexed:
            assert index_pending_messages(state)
        grid.push_messages([message(node_id, str(node_id)) for node_id in nodes])
        checks = count_checks(state)
        handed = sweep(state, nodes)
        assert sorted(tag for _, tag in handed) == sorted(str(n) for n in nodes)
        if most is None:
            assert checks["checked"] > sites * sites / 2  # Flower's own: every ask walks every stored message
        else:
            assert checks["checked"] <= most
        checks["checked"] = 0
        assert sweep(state, nodes) == []
        if indexed:
            assert checks["checked"] == 0  # delivered messages are out of the index
        else:
            assert checks["checked"] == sites * sites


def test_messages_stored_before_the_index_are_indexed() -> None:
    state, grid, nodes = simulation_state(3)
    grid.push_messages([message(nodes[1], "early")])
    assert index_pending_messages(state)
    assert type(state) is IndexedLinkState
    assert sweep(state, nodes) == [(nodes[1], "early")]


def test_only_flowers_exact_class_is_changed() -> None:
    state, _, _ = simulation_state(1)
    assert index_pending_messages(state)
    assert not index_pending_messages(state)  # already indexed
    assert not index_pending_messages(object())
