"""Evaluation sampling (``eval-fraction``): a public draw of sites per round, every site in the last round."""

from __future__ import annotations

import pytest
from fake_grid import ScriptedGrid, scripted_site
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fedcl.run_config import ConfigError, parse_run_config
from server.strategy_setup import build_strategy
from strategies.node_sampling import EvaluationSampling


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_a_tenth_of_a_hundred_sites_is_ten_drawn_from_the_seed_and_round():
    sampling = EvaluationSampling(0.1, seed=7, every_site=lambda r: r == 5)
    nodes = list(range(100, 200))
    first = sampling.chosen(1, nodes)
    assert len(first) == 10 and set(first) <= set(nodes) and first == sorted(first)
    assert EvaluationSampling(0.1, seed=7).chosen(1, nodes) == first  # public: anyone can redo the draw
    assert sampling.chosen(2, nodes) != first
    assert sampling.chosen(5, nodes) == nodes  # the last round: every site
    assert EvaluationSampling(0.001).chosen(1, nodes[:3]) and len(EvaluationSampling(0.001).chosen(1, nodes)) == 1


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ConfigError, match="eval-fraction"):
        parse_run_config({"eval-fraction": fraction})


def test_sites_left_out_of_a_sampled_evaluation_are_not_missing_and_the_round_does_not_fail():
    config = parse_run_config({"num-sites": 10, "recipe": "lora", "dp": False, "eval-fraction": 0.2, "num-rounds": 3})
    strategy = build_strategy(config)
    strategy.poll_seconds = 0.02
    grid = ScriptedGrid({node: scripted_site(f"s{node}", node) for node in range(1, 11)})
    for server_round in (1, 2, 3):
        train = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        strategy.aggregate_train(server_round, grid.send_and_receive(train))
        evaluate = list(strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(evaluate))
        replies = strategy.evaluate_replies[server_round]
        expected = 10 if server_round == 3 else 2  # every site in the run's last round
        assert len(evaluate) == expected
        assert [r.status for r in replies] == ["evaluated"] * expected  # nobody marked missing
        assert server_round not in strategy.round_failures
    assert sorted(strategy.server_seconds) == [1, 2, 3]  # messages and aggregation of every round are timed
    assert all(0 < seconds < 5 for seconds in strategy.server_seconds.values())
