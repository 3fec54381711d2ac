"""Lost sites and late replies: sampling never stalls, short rounds fail without touching the model, runs stop.

The strategy is driven with a scripted Grid and hand-made reply Messages
(``tests/fake_grid.py``), as Flower's own strategy tests do; expected models
are computed by hand from the sites' updates.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from fake_grid import ScriptedGrid, evaluate_reply, scripted_site, site_update, train_reply
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcl.run_config import parse_run_config
from server.app import main
from server.round_guard import RoundGuard, RunFailed
from server.strategy_setup import build_strategy
from strategies.node_sampling import wait_for_nodes


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages need a run and node identity, which Flower sets in its own processes."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def mean_update(indices: list[int], round_number: int, received: dict) -> np.ndarray:
    """FedAvg of equally weighted site updates, by hand."""
    return np.mean([site_update(i, round_number, received)["w"].astype(np.float64) for i in indices], axis=0)


def strategy_for(num_sites: int, **keys):
    config = parse_run_config({"num-sites": num_sites, "recipe": "lora", "dp": False, **keys})
    strategy = build_strategy(config)
    strategy.poll_seconds = 0.02
    return strategy


def one_round(strategy, grid: ScriptedGrid, round_number: int):
    """Flower's round, as Strategy.start runs it: train, aggregate, evaluate, aggregate."""
    train = list(strategy.configure_train(round_number, ArrayRecord(), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(round_number, grid.send_and_receive(train))
    evaluate = list(strategy.configure_evaluate(round_number, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_evaluate(round_number, grid.send_and_receive(evaluate))
    return arrays


def test_a_node_that_never_connects_does_not_stall_sampling_beyond_the_timeout():
    strategy = strategy_for(2)
    strategy.wait_timeout = 0.3
    grid = ScriptedGrid({1: scripted_site("a", 0)}, connected=[1])  # node 2 never connects
    started = time.monotonic()
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    waited = time.monotonic() - started
    assert 0.3 <= waited < 1.5
    assert [m.metadata.dst_node_id for m in messages] == [1]  # the round goes on with whoever is connected
    assert strategy.aggregate_train(1, grid.send_and_receive(messages)) == (None, None)
    assert strategy.round_failures[1] == "1 of 2 required training replies: 1 site(s) not connected"

    grid.connected.add(2)  # both there: no wait at all
    started = time.monotonic()
    assert len(list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid))) == 2
    assert time.monotonic() - started < 0.2


def test_sampling_returns_as_soon_as_the_last_node_connects():
    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1)}, connected=[1])
    threading.Timer(0.2, grid.connected.add, args=(2,)).start()
    started = time.monotonic()
    assert wait_for_nodes(grid, required=2, timeout=10.0, poll_seconds=0.02) == [1, 2]
    assert time.monotonic() - started < 2.0
    with pytest.raises(ValueError, match="positive timeout"):
        wait_for_nodes(grid, required=2, timeout=0.0)


def test_a_round_with_too_few_replies_is_failed_and_leaves_the_model_and_the_optimizer_unchanged():
    sites = {1: scripted_site("a", 0), 2: scripted_site("b", 1), 3: scripted_site("c", 2, silent_from=2)}
    grid = ScriptedGrid(sites)
    strategy = strategy_for(3, **{"server-optimizer": "adam", "robust": "none"})  # min-replies 0: every site
    first = one_round(strategy, grid, 1)
    np.testing.assert_allclose(strategy.current["w"], mean_update([0, 1, 2], 1, {}), rtol=1e-6)
    assert first is not None and 1 not in strategy.round_failures
    model, moments = dict(strategy.current), strategy.aggregator.state_dict()

    # Round 2: site c has gone silent (its reply misses the timeout): 2 of 3 replies, the round fails.
    arrays = one_round(strategy, grid, 2)
    assert arrays is None
    assert "2 of 3 required training replies" in strategy.round_failures[2]
    assert "c missing (no reply within the round timeout" in strategy.round_failures[2]
    assert strategy.round_unusable[2] == ["c"]
    assert {r.site: r.status for r in strategy.train_replies[2]} == {"a": "trained", "b": "trained", "c": "missing"}
    np.testing.assert_array_equal(strategy.current["w"], model["w"])
    after = strategy.aggregator.state_dict()
    assert sorted(after) == sorted(moments) and all(np.array_equal(after[k], moments[k]) for k in moments)
    assert 2 not in strategy.updated_rounds


def test_a_short_evaluation_undoes_the_rounds_update():
    answers = {1: scripted_site("a", 0), 2: scripted_site("b", 1)}

    def trains_but_does_not_evaluate(message):
        return None if message.metadata.message_type == "evaluate" else answers[2](message)

    grid = ScriptedGrid({1: answers[1], 2: answers[2]})
    strategy = strategy_for(2)
    one_round(strategy, grid, 1)
    model = strategy.current["w"].copy()
    grid.answers[2] = trains_but_does_not_evaluate
    assert one_round(strategy, grid, 2) is not None  # training went through ...
    assert "1 of 2 required evaluation replies" in strategy.round_failures[2]  # ... evaluation did not
    np.testing.assert_array_equal(strategy.current["w"], model)  # so the round's update is undone
    assert 2 not in strategy.updated_rounds


def test_min_replies_lets_a_round_go_on_without_a_lost_site():
    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1), 3: scripted_site("c", 2, silent_from=1)})
    strategy = strategy_for(3, **{"min-replies": 2})
    arrays = one_round(strategy, grid, 1)
    assert arrays is not None and 1 not in strategy.round_failures
    np.testing.assert_allclose(strategy.current["w"], mean_update([0, 1], 1, {}), rtol=1e-6)


def test_a_skipping_site_counts_as_a_reply_but_an_error_does_not():
    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1, skip=True)})
    strategy = strategy_for(2)
    one_round(strategy, grid, 1)  # b skipped by its own budget: the round stands with a's update
    assert 1 not in strategy.round_failures
    np.testing.assert_allclose(strategy.current["w"], mean_update([0], 1, {}), rtol=1e-6)

    from flwr.app import Error, Message

    grid.answers[2] = lambda m: (
        Message(Error(code=0, reason="crash"), reply_to=m)
        if m.metadata.message_type == "train"
        else evaluate_reply(m, "b", 0.5)
    )
    assert one_round(strategy, grid, 2) is None
    assert "b failed (crash)" in strategy.round_failures[2]


def flat_run(tmp_path, **keys) -> dict:
    return {
        "recipe": "lora",
        "num-rounds": 6,
        "num-sites": 2,
        "dp": False,
        "output-dir": str(tmp_path / "run"),
        "max-failed-rounds": 2,
        **keys,
    }


def run_main(grid, flat: dict) -> None:
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=flat))


def test_the_run_stops_after_max_failed_rounds_in_a_row_with_status_failed(tmp_path):
    grid = ScriptedGrid({1: scripted_site("site-0", 0), 2: scripted_site("site-1", 1, silent_from=2)})
    with pytest.raises(RunFailed, match="2 failed rounds in a row"):
        run_main(grid, flat_run(tmp_path))  # the ServerApp's main raises: Flower records the run as failed
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rounds"] == [2, 3]
    assert "max-failed-rounds = 2" in summary["failure_reason"] and "site-1 missing" in summary["failure_reason"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["round"] for r in rows) == 3  # rounds 4..6 never ran
    failed = [r for r in rows if r.get("event") == "round-failed"]
    assert [(r["round"], r["unusable_sites"]) for r in failed] == [(2, ["site-1"]), (3, ["site-1"])]
    assert {(r["round"], r["site"]): r.get("round_status") for r in rows if "site" in r}[(2, "site-0")] == "failed"
    assert summary["accuracy_round"] == 1  # the last round that was not failed
    saved = dict(np.load(run_dir / "checkpoint" / "global.npz"))
    np.testing.assert_allclose(saved["w"], mean_update([0, 1], 1, {}), rtol=1e-6)  # round 1's model, untouched
    assert not (run_dir / "adapter").exists()  # a failed run exports nothing


def test_a_run_that_trained_nothing_is_failed_not_completed(tmp_path):
    grid = ScriptedGrid({1: scripted_site("site-0", 0, skip=True), 2: scripted_site("site-1", 1, skip=True)})
    with pytest.raises(RunFailed, match="trained nothing"):
        run_main(grid, flat_run(tmp_path, **{"num-rounds": 2}))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rounds"] == [] and summary["rounds_completed"] == 2


def test_a_config_error_fails_the_run_with_one_line(tmp_path):
    with pytest.raises(RunFailed) as err:
        run_main(ScriptedGrid({}), flat_run(tmp_path, **{"min-replies": 5}))
    assert "'min-replies'" in str(err.value) and "\n" not in str(err.value)


def test_the_guard_counts_failed_rounds_in_a_row_only():
    guard = RoundGuard(max_failed_rounds=2)
    assert guard.record(1, "short", updated=False) is None
    assert guard.record(2, None, updated=True) is None  # a good round resets the streak
    assert guard.record(3, "short", updated=False) is None
    assert "round 4: lost" in guard.record(4, "lost", updated=False)
    assert guard.verdict(None) == ("completed", None)


def test_an_unknown_reply_status_is_not_a_usable_reply():
    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1)})
    strategy = strategy_for(2)
    grid.answers[2] = lambda m: (
        train_reply(m, "b", None, status="refused", reason="the site declines: another run holds its lock")
        if m.metadata.message_type == "train"
        else evaluate_reply(m, "b", 0.5)
    )
    assert one_round(strategy, grid, 1) is None
    assert {r.site: r.status for r in strategy.train_replies[1]} == {"a": "trained", "b": "refused"}


def test_an_update_the_robust_rule_rejects_still_counts_as_taking_part():
    def attacker(message):
        if message.metadata.message_type == "evaluate":
            return evaluate_reply(message, "c", 0.1)
        return train_reply(message, "c", {"w": np.full(4, 1e6, np.float32)})

    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1), 3: attacker})
    strategy = strategy_for(3)  # robust = "validate": the norm far above the median's is rejected
    assert one_round(strategy, grid, 1) is not None and 1 not in strategy.round_failures
    assert {r.site: r.status for r in strategy.train_replies[1]} == {"a": "trained", "b": "trained", "c": "rejected"}
    np.testing.assert_allclose(strategy.current["w"], mean_update([0, 1], 1, {}), rtol=1e-6)


def test_a_rounds_messages_expire_with_its_timeout():
    """A site that returns after the server closed a round must not receive (and pay for) that round's message."""
    from fedcl.run_config import parse_run_config
    from server.strategy_setup import build_strategy

    strategy = build_strategy(parse_run_config({"num-sites": 2, "recipe": "lora", "round-timeout": 42.0}))
    grid = ScriptedGrid({1: scripted_site("a", 0), 2: scripted_site("b", 1)})
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.ttl for m in messages] == [42.0, 42.0]
