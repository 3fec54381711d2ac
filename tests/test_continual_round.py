"""A site's rounds in a stream: EWC under DP, the replay buffer across a restart, what the ledger counts, skips,
the private NCM release, and the server's accuracy matrix. Tiny random BERT, BBC News, a few records."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from client.privacy_ledger import PrivacyLedger, compute_epsilon
from client.replay_buffer import ReplayBuffer
from client.site_state import SiteState
from fedcl.model_factory import set_trainable_arrays, trainable_arrays
from simulations.run import prepare_config, pyproject_defaults


def flat_config(model_dir, **keys) -> dict:
    return {**pyproject_defaults(), "model": str(model_dir), "num-sites": 2, "stream": "class-incremental",
            "num-experiences": 2, "probe-rounds": 1, "probe-steps": 3, "probe-batch-size": 8, "num-rounds": 0,
            "max-length": 32, "max-train-examples": 40, "max-test-examples": 20, "accountant": "rdp",
            "noise-multiplier": 1.0, "batch-size": 8, "local-steps": 2, **keys}


def runtime_of(flat: dict, site: int = 0):
    from client.site_runtime import site_runtime

    runtime = site_runtime(flat, {"partition-id": site, "num-partitions": flat["num-sites"]})
    set_trainable_arrays(runtime.adapter.model, runtime.adapter.initial_state)
    return runtime


def run_round(runtime, server_round: int, folder):
    """One training round as the ClientApp runs it: the server's round config, then the site's round."""
    from client.continual_round import stream_context, train_continual_round

    schedule = stream_context(runtime).schedule
    config = {"server-round": server_round, **schedule.round_config(server_round)}
    return train_continual_round(runtime, config, SiteState(folder))


def forget_process_state() -> None:
    """What a restarted site process would not have: every module-level cache."""
    import client.continual_round as continual_round
    import client.site_runtime as site_runtime
    import client.site_trainer as site_trainer
    import fedcl.model_factory as model_factory

    for cache in (continual_round._CONTEXTS, site_runtime._DATASETS, site_runtime._ENCODED, site_trainer._FEATURES,
                  model_factory._CACHE):
        cache.clear()


def distance(arrays: dict, anchor: dict) -> float:
    return sum(float(np.sum((arrays[k] - anchor[k]) ** 2)) for k in anchor)


@pytest.mark.parametrize("phase", ["probe", "lora"])
def test_under_dp_ewc_changes_the_update_and_holds_it_near_the_anchor(tiny_model_dir, phase):
    """Same seed and noise; lambda 0 vs 20 through the round's own penalty wiring (head-only in probe rounds)."""
    from client.continual_round import _penalty, _train_pool, stream_context
    from client.ewc import EwcState

    flat = flat_config(tiny_model_dir, **{"ewc-lambda": 20.0, "learning-rate": 0.05, "probe-learning-rate": 0.05})
    strong = runtime_of(flat)
    free = dataclasses.replace(strong, config=dataclasses.replace(strong.config, ewc_lambda=0.0))
    anchor = trainable_arrays(strong.adapter.model)
    ewc = EwcState()
    ewc.consolidate(0, {k: np.ones_like(v) for k, v in anchor.items()}, anchor)
    pool = stream_context(strong).train_positions(0)
    results = {}
    for name, runtime in (("free", free), ("held", strong), ("free again", free)):
        set_trainable_arrays(runtime.adapter.model, anchor)
        torch.manual_seed(0)  # the tiny BERT's dropout draws from the global generator
        _train_pool(runtime, phase, pool, 1.0, 1.0, 7, _penalty(runtime, ewc, phase))
        results[name] = trainable_arrays(runtime.adapter.model)
    assert all(np.array_equal(results["free"][k], results["free again"][k]) for k in anchor)  # same seed, same noise
    moved = [k for k in anchor if not np.array_equal(results["free"][k], results["held"][k])]
    assert moved and (phase == "lora" or all("classifier" in k for k in moved))  # probe rounds train the head only
    assert distance(results["held"], anchor) < 0.5 * distance(results["free"], anchor)


def test_ledger_counts_replayed_records_and_exactly_the_importance_steps(tiny_model_dir, tmp_path):
    """Same schedule and noise, EWC on vs off: the histories differ by the importance batches and nothing else."""
    from client.continual_round import stream_context

    ledgers = {}
    for lam in (0.0, 10.0):
        flat = flat_config(tiny_model_dir, **{"ewc-lambda": lam, "replay-size": 6, "ewc-importance-batches": 4,
                                              "noise-multiplier": 3.0})
        runtime, folder = runtime_of(flat), tmp_path / f"lambda-{lam}"
        for server_round in (1, 2):
            result = run_round(runtime, server_round, folder)
            assert result.status == "trained", result.reason
        ledgers[lam] = PrivacyLedger.load(folder / "privacy_ledger.json")
        context = stream_context(runtime)
        sizes = [len(context.train_positions(e)) for e in (0, 1)]
    assert result.metrics["replayed-examples"] == 6 and result.metrics["pool-examples"] == sizes[1] + 6
    # The replayed records are in the population DP-SGD samples from: the recorded rate is batch / (experience + buffer).
    assert ledgers[0.0].history[-1] == (3.0, 8 / (sizes[1] + 6), 3)
    importance = (3.0, 8 / sizes[0], 4)  # probe-only run: the head's importances, at the probe batch
    assert ledgers[10.0].total_steps == ledgers[0.0].total_steps + 4
    recomputed = compute_epsilon([*ledgers[0.0].history, importance], 1e-5, "rdp")
    assert ledgers[10.0].epsilon() == pytest.approx(recomputed, rel=1e-9)
    assert ledgers[10.0].epsilon() > ledgers[0.0].epsilon()


def test_replay_buffer_survives_a_restart_stays_bounded_and_holds_every_past_experience(tiny_model_dir, tmp_path):
    flat = flat_config(tiny_model_dir, **{"num-experiences": 3, "replay-size": 9, "replay-policy": "class-balanced",
                                          "dp": False, "partition": "iid"})
    runtime = runtime_of(flat)
    for server_round in (1, 2, 3):
        assert run_round(runtime, server_round, tmp_path).status == "trained"
    config = runtime.config
    seed, size = config.seed * 1000, len(runtime.data.train)
    saved = ReplayBuffer.load(tmp_path, 9, "class-balanced", seed, size)
    forget_process_state()
    restarted = runtime_of(flat)
    from client.continual_round import stream_context

    context = stream_context(restarted)
    assert saved.experiences == [0, 1] and 0 < len(saved) <= 9
    kept = set(saved.positions().tolist())
    for past in (0, 1):
        assert kept & set(context.train_positions(past).tolist())  # every past experience is represented
    again = run_round(restarted, 3, tmp_path)  # the restarted site retries the last round
    reloaded = ReplayBuffer.load(tmp_path, 9, "class-balanced", seed, size)
    assert np.array_equal(reloaded.positions(), saved.positions()) and reloaded.experiences == [0, 1]
    assert again.metrics["replayed-examples"] == len(saved)


def write_csv(path, rows) -> None:
    path.write_text("text,label,site\n" + "".join(f"{t},{y},{s}\n" for t, y, s in rows), encoding="utf-8")


def skewed_csv(tmp_path):
    """Site A holds labels x and y only; site B all three: experience "z" is empty at site A."""
    words = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa"]
    rows = [(f"{words[i % 5]} {label} {i}", label, site) for site, labels in (("A", "xy"), ("B", "xyz"))
            for label in labels for i in range(10)]
    path = tmp_path / "skewed.csv"
    write_csv(path, rows)
    return path


def test_empty_experience_is_a_logged_skip_and_a_preflight_note(tiny_model_dir, tmp_path, capsys):
    keys = {"dataset": str(skewed_csv(tmp_path)), "label-column": "label", "group-column": "site",
            "partition": "group", "stream-groups": "x,y;z", "num-experiences": 0, "max-train-examples": 0,
            "max-test-examples": 0}
    flat = flat_config(tiny_model_dir, **keys)
    prepare_config(dict(keys, model=str(tiny_model_dir), stream="class-incremental", **{"num-sites": 2}), tmp_path)
    assert "site-1 has no training records in experience(s) [1]" in capsys.readouterr().err  # site-1 is group A
    runtime = runtime_of(flat, site=1)
    assert run_round(runtime, 1, tmp_path / "a").status == "trained"
    skipped = run_round(runtime, 2, tmp_path / "a")
    assert skipped.status == "skipped" and "empty experience" in skipped.reason


@pytest.mark.parametrize("keys, words", [
    ({"replay-size": 10_000}, "replay-size.*only .* training records"),
    ({"stream-groups": "business,sport;nonsense"}, "unknown labels"),
    ({"num-experiences": 9}, "num-experiences"),
])
def test_bad_stream_input_stops_in_preflight_with_the_fix(tiny_model_dir, tmp_path, keys, words):
    from fedcl.run_config import ConfigError

    with pytest.raises(ConfigError, match=words):
        prepare_config({"model": str(tiny_model_dir), "stream": "class-incremental", "num-experiences": 2,
                        "max-train-examples": 40, **keys}, tmp_path)


def test_ncm_release_once_per_experience_in_the_ledger_and_summed_by_the_server(tiny_model_dir, tmp_path):
    from client.continual_round import stream_context
    from client.ncm_round import release_round
    from strategies.aggregation import SiteUpdate
    from strategies.ncm_aggregator import ClassSumAggregator

    flat = flat_config(tiny_model_dir, recipe="ncm", **{"noise-multiplier": 0.0, "accountant": "rdp"})
    runtime = runtime_of(flat)
    context = stream_context(runtime)
    total: dict = {}
    for slot in (0, 1):
        config = {"server-round": slot + 1, **context.schedule.round_config(slot + 1)}
        result, sums = release_round(runtime, config, SiteState(tmp_path))
        assert result.status == "trained"
        released = np.flatnonzero(np.abs(sums).sum(axis=1) > 0)
        assert set(released) == set(context.labels[slot].tolist())  # exactly the experience's classes, noised
        total = ClassSumAggregator().aggregate(total, [SiteUpdate("site-0", {"class-sums": sums}, 1)])
    ledger = PrivacyLedger.load(tmp_path / "privacy_ledger.json")
    sigma = ledger.history[0][0]
    assert ledger.history == [(sigma, 1.0, 2)]  # two releases, each one Gaussian step at sample rate 1
    assert 8.0 - 0.1 <= ledger.epsilon() <= 8.0  # calibrated for both releases together
    assert np.count_nonzero(np.abs(total["class-sums"]).sum(axis=1)) == len(runtime.data.label_names)


def test_server_builds_the_accuracy_matrix_from_site_counts(tmp_path):
    from fedcl.run_config import parse_run_config
    from server.continual_run import ContinualRun
    from strategies.site_strategy import SiteReply

    config = parse_run_config({"stream": "class-incremental", "num-experiences": 2, "probe-rounds": 1,
                               "num-rounds": 0, "num-sites": 2})
    run = ContinualRun(config, tmp_path)
    counts = {1: [{"exp-0-correct": 8, "exp-0-total": 10}, {"exp-0-correct": 10, "exp-0-total": 10}],
              2: [{"exp-0-correct": 4, "exp-0-total": 10, "exp-1-correct": 9, "exp-1-total": 10},
                  {"exp-0-correct": 6, "exp-0-total": 10, "exp-1-correct": 7, "exp-1-total": 10}]}
    for server_round, replies in counts.items():
        run.on_round_end(server_round, [SiteReply(f"site-{i}", "evaluated", metrics=m) for i, m in enumerate(replies)])
    summary = run.summary()
    assert summary["accuracy_matrix"] == [[0.9], [0.5, 0.8]]
    assert summary["forgetting"] == pytest.approx(0.4) and summary["bwt"] == pytest.approx(-0.4)
    assert summary["average_accuracy"] == pytest.approx(0.65)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["experience"], r["round"]) for r in rows] == [(0, 1), (1, 2)]


def test_warm_recalibration_meets_the_budget_and_is_reused_while_the_plan_holds(tmp_path):
    from client.noise_plan import calibrate
    from client.warm_calibration import noise_for_plan

    ledger = PrivacyLedger(8.0, 1e-5, "rdp", [(2.0, 0.1, 100)])
    first = noise_for_plan(tmp_path / "plan.json", ledger, [(0.1, 200)])
    ledger.record(first.noise_multiplier, 0.1, 50)
    changed = noise_for_plan(tmp_path / "plan.json", ledger, [(0.12, 150), (0.2, 40)])  # a new experience
    reference = calibrate(ledger, [(0.12, 150), (0.2, 40)])
    assert 8.0 - 0.1 <= changed.planned_epsilon <= 8.0
    assert changed.noise_multiplier == pytest.approx(reference.noise_multiplier, rel=0.03)
    ledger.record(changed.noise_multiplier, 0.12, 50)
    assert noise_for_plan(tmp_path / "plan.json", ledger, [(0.12, 100), (0.2, 40)]) == changed  # still the plan


def test_probe_rounds_train_only_the_rows_of_classes_seen_so_far(tiny_model_dir, tmp_path):
    """No DP noise lands on the head rows of future classes; the evaluation predicts among seen classes only."""
    from client.continual_round import experience_metrics, stream_context
    from client.head_features import head_module

    runtime = runtime_of(flat_config(tiny_model_dir))
    head = head_module(runtime.adapter.model)
    before = head.weight.detach().clone()
    assert run_round(runtime, 1, tmp_path).status == "trained"
    context = stream_context(runtime)
    seen, unseen = context.labels[0], context.labels[1]
    changed = (head.weight.detach() != before).any(dim=1)
    assert changed[torch.as_tensor(seen)].all() and not changed[torch.as_tensor(unseen)].any()
    metrics = experience_metrics(runtime, {"server-round": 1})
    assert metrics["experiences-seen"] == 1 and set(metrics) >= {"exp-0-correct", "exp-0-total", "accuracy"}


def test_fixed_importance_noise_is_planned_as_fixed_steps_and_the_site_stays_within_budget(tiny_model_dir, tmp_path):
    """ewc-importance-noise > 0: the importance batches use it, the calibrated DP-SGD noise covers the rest."""
    flat = flat_config(tiny_model_dir, **{"ewc-lambda": 5.0, "ewc-importance-noise": 6.0, "noise-multiplier": 0.0,
                                          "ewc-importance-batches": 3, "max-train-examples": 120, "partition": "iid"})
    runtime = runtime_of(flat)
    for server_round in (1, 2):
        assert run_round(runtime, server_round, tmp_path).status == "trained"
    ledger = PrivacyLedger.load(tmp_path / "privacy_ledger.json")
    assert [entry for entry in ledger.history if entry[0] == 6.0] == [(6.0, ledger.history[1][1], 3)]
    assert ledger.history[1] == (6.0, ledger.history[1][1], 3)  # after experience 0's probe round, before experience 1's
    assert ledger.history[0][0] != 6.0 and ledger.epsilon() <= 8.0


def test_ewc_holds_only_the_rows_of_classes_seen_when_it_consolidates(tiny_model_dir, tmp_path):
    """Rows of classes still to come never trained: their importance is zero, so EWC leaves them free to learn."""
    from client.continual_round import _head_prefix, stream_context
    from client.ewc import EwcState

    runtime = runtime_of(flat_config(tiny_model_dir, **{"ewc-lambda": 5.0, "dp": False}))
    for server_round in (1, 2):
        assert run_round(runtime, server_round, tmp_path).status == "trained"
    ewc = EwcState.load(tmp_path, "separate", 1.0)
    context, prefix = stream_context(runtime), _head_prefix(runtime.adapter.model)
    weight = ewc.importances[0][prefix + "weight"]
    assert np.all(weight[context.labels[1]] == 0) and np.any(weight[context.labels[0]] > 0)


def test_a_site_whose_budget_is_spent_skips_with_the_reason_instead_of_failing(tiny_model_dir, tmp_path):
    """A ledger that has already spent the budget (e.g. a state directory reused): a logged skip, no crash."""
    flat = flat_config(tiny_model_dir, **{"noise-multiplier": 0.0})
    PrivacyLedger(8.0, 1e-5, "rdp", [(0.5, 1.0, 100)]).save(tmp_path / "privacy_ledger.json")
    result = run_round(runtime_of(flat), 1, tmp_path)
    assert result.status == "skipped" and "privacy budget" in result.reason
    assert result.metrics["stopped-for-budget"] == 1
