"""A site's name is bound to the node that first claimed it: impostors are refused, a restarted site re-binds.

Replies are hand-made Messages through the real strategy (``tests/fake_grid.py``);
the expected global model is the hand-computed mean of the accepted sites' updates.
"""

from __future__ import annotations

import numpy as np
import pytest
from fake_grid import ScriptedGrid, scripted_site, site_update
from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from flwr.supercore.task_identity import TaskIdentity

from fedcl.run_config import parse_run_config
from server.strategy_setup import build_strategy
from strategies.site_identity import SiteIdentities


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages need a run and node identity, which Flower sets in its own processes."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def train_round(strategy, grid: ScriptedGrid, round_number: int):
    messages = list(strategy.configure_train(round_number, ArrayRecord(), ConfigRecord(), grid))
    return strategy.aggregate_train(round_number, grid.send_and_receive(messages))


def by_site(strategy, round_number: int) -> dict[str, tuple[str, str]]:
    return {r.site: (r.status, r.reason) for r in strategy.train_replies[round_number]}


def expected_mean(indices: list[int], round_number: int, received: dict) -> np.ndarray:
    return np.mean([site_update(i, round_number, received)["w"].astype(np.float64) for i in indices], axis=0)


def strategy_for(num_sites: int, **keys):
    return build_strategy(parse_run_config({"num-sites": num_sites, "recipe": "lora", "robust": "none", **keys}))


def test_a_second_node_claiming_a_connected_sites_name_is_rejected_and_not_aggregated():
    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1)})
    strategy = strategy_for(2)
    train_round(strategy, grid, 1)
    assert strategy.identities.nodes == {"a": 1, "b": 2}

    grid.answers[3] = scripted_site("a", 7)  # node 3 says it is site a while node 1 is still connected
    grid.connected.add(3)
    received = dict(strategy.current)
    arrays, metrics = train_round(strategy, grid, 2)
    status, reason = by_site(strategy, 2)["node-3"]
    assert status == "rejected" and "node 3" in reason and "node 1" in reason and "'a'" in reason
    assert by_site(strategy, 2)["a"][0] == "trained" and metrics["sites-trained"] == 2
    np.testing.assert_allclose(strategy.current["w"], expected_mean([0, 1], 2, received), rtol=1e-6)
    assert strategy.identities.nodes["a"] == 1


def test_the_name_rebinds_to_a_new_node_once_the_first_has_left():
    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1)})
    strategy = strategy_for(2)
    train_round(strategy, grid, 1)
    # Site a's SuperNode restarts without node authentication: node 1 is gone, node 5 comes back as "a".
    del grid.answers[1]
    grid.connected.discard(1)
    grid.answers[5] = scripted_site("a", 0)
    grid.connected.add(5)
    received = dict(strategy.current)
    arrays, _ = train_round(strategy, grid, 2)
    assert arrays is not None and by_site(strategy, 2)["a"] == ("trained", "")
    assert strategy.identities.nodes == {"a": 5, "b": 2} and strategy.identities.name_of(1) == "node-1"
    np.testing.assert_allclose(strategy.current["w"], expected_mean([0, 1], 2, received), rtol=1e-6)


def test_two_nodes_claiming_one_name_in_one_round_the_second_is_refused_even_if_the_first_is_gone():
    identities = SiteIdentities()
    assert identities.claim(1, "a", connected=set()).refused == ""  # node 1 left right after replying
    second = identities.claim(2, "a", connected=set())
    assert second.site == "node-2" and "node 1 already claimed in this round" in second.refused
    identities.begin_round()  # the next round: node 1 is gone, so node 2 takes the name over
    assert identities.claim(2, "a", connected=set()).refused == "" and identities.nodes == {"a": 2}


def test_a_node_cannot_switch_names_or_send_a_nameless_reply():
    identities = SiteIdentities()
    identities.claim(1, "a", connected={1})
    identities.begin_round()
    assert "bound to site 'a'" in identities.claim(1, "b", connected={1}).refused
    assert "names no site" in identities.claim(4, "", connected={1, 4}).refused
    assert identities.nodes == {"a": 1}


def test_an_error_reply_is_named_by_its_nodes_binding():
    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1)})
    strategy = strategy_for(2, **{"min-replies": 1})
    train_round(strategy, grid, 1)
    grid.answers[2] = lambda m: Message(Error(code=0, reason="out of memory"), reply_to=m)
    train_round(strategy, grid, 2)
    assert by_site(strategy, 2)["b"] == ("failed", "out of memory")


def test_bindings_survive_the_checkpoint():
    identities = SiteIdentities()
    identities.claim(11, "a", connected=set())
    identities.claim(12, "b", connected=set())
    restored = SiteIdentities()
    restored.restore(identities.state())
    assert restored.sites == {11: "a", 12: "b"} and restored.nodes == {"a": 11, "b": 12}
    assert "still connected" in restored.claim(13, "a", connected={11, 12, 13}).refused


def test_with_registered_nodes_a_name_is_accepted_only_from_its_registered_node_even_first():
    """site-nodes binds each name to the node id of the site's registered key: claiming first wins nothing."""
    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1), 3: scripted_site("a", 7)})
    strategy = strategy_for(3, **{"site-nodes": "a=1,b=2", "min-replies": 2})
    identities = strategy.identities
    assert "registered to node 1" in identities.claim(3, "a", connected={1, 2, 3}).refused  # 3 asks first
    assert "not among the registered sites" in identities.claim(3, "c", connected={1, 2, 3}).refused
    identities.begin_round()
    received = dict(strategy.current)
    train_round(strategy, grid, 1)
    assert by_site(strategy, 1)["node-3"][0] == "rejected" and by_site(strategy, 1)["a"] == ("trained", "")
    np.testing.assert_allclose(strategy.current["w"], expected_mean([0, 1], 1, received), rtol=1e-6)
    assert identities.nodes == {"a": 1, "b": 2}


def test_a_malformed_site_nodes_list_names_the_fix():
    from fedcl.run_config import ConfigError

    with pytest.raises(ConfigError, match="site=node-id pairs"):
        parse_run_config({"site-nodes": "a=1,b=x"})
    assert parse_run_config({"site-nodes": " a=1 , b=22"}).site_node_ids == {"a": 1, "b": 22}


def test_the_pilot_remembers_each_registered_keys_node_for_site_nodes(tmp_path):
    from fedcl.pilot.registration import Registration, record_registration, registered_nodes, site_nodes_value

    record_registration(tmp_path, Registration("hospital-b", "977", "SHA256:x", already_registered=False))
    record_registration(tmp_path, Registration("hospital-a", "4012", "SHA256:y", already_registered=False))
    record_registration(tmp_path, Registration("hospital-a", "", "SHA256:y", already_registered=True))  # keeps 4012
    assert registered_nodes(tmp_path) == {"hospital-a": 4012, "hospital-b": 977}
    value = site_nodes_value(registered_nodes(tmp_path))
    assert parse_run_config({"site-nodes": value}).site_node_ids == {"hospital-a": 4012, "hospital-b": 977}
