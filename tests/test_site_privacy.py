"""A site's privacy over its life, against the server: its own policy and state, the filter, the lock, the sentinel,
what its replies carry, and restarts. A tiny random BERT on a small topic CSV."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from site_helpers import (
    TRAINING_REPLY_KEYS,
    forget_process_state,
    policy_of,
    run_round,
    runtime_of,
    site_context,
    write_topic_csv,
)

from client.privacy_ledger import LedgerError, PrivacyLedger
from client.site_budget import SiteBusyError
from client.site_policy import site_policy
from fedcl.protocol import ARRAYS_RECORD, DP_TRAIN_METRICS, METRICS_RECORD, SITE_RECORD
from fedcl.run_config import ConfigError


@pytest.fixture()
def csv_dataset(tmp_path: Path) -> Path:
    return write_topic_csv(tmp_path / "data.csv")


def run_config(model_dir: Path, dataset: Path, **overrides) -> dict:
    flat = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "num-sites": 2,
        "max-length": 16,
        "probe-rounds": 3,
        "probe-steps": 4,
        "probe-batch-size": 8,
        "num-rounds": 2,
        "local-steps": 2,
        "batch-size": 8,
        "target-epsilon": 8.0,
        "partition": "iid",
    }
    flat.update(overrides)
    return flat


def fresh_accountant_epsilon(history: list, delta: float, order: float) -> float:
    """Opacus' own RDP accountant, fed step by step, converted at one order (the filter's)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for sigma, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    epsilon, _ = accountant.get_privacy_spent(delta=delta, alphas=[order])
    return float(epsilon)


def test_epsilon_continues_across_a_restart_and_equals_a_fresh_accountant(tiny_model_dir, csv_dataset, tmp_path):
    flat = run_config(tiny_model_dir, csv_dataset)
    epsilons = []
    for server_round in (1, 2):
        epsilons.append(run_round(runtime_of(flat), server_round, tmp_path / "state").metrics["epsilon"])
    forget_process_state()  # the site's process dies; only its state directory remains
    for server_round in (3, 4, 5):
        epsilons.append(run_round(runtime_of(flat), server_round, tmp_path / "state").metrics["epsilon"])
    assert all(b > a for a, b in zip(epsilons, epsilons[1:]))  # never reset
    ledger = PrivacyLedger.load(tmp_path / "state" / "privacy_ledger.json")
    assert ledger.total_steps == 3 * 4 + 2 * 2
    assert epsilons[-1] == pytest.approx(fresh_accountant_epsilon(ledger.history, 1e-5, ledger.filter_order), rel=1e-6)
    assert 8.0 - 0.2 <= epsilons[-1] <= 8.0  # the whole plan, calibrated to the budget


def test_the_ledger_prices_a_mixed_history_as_a_fresh_opacus_accountant(tmp_path):
    """Probe rate, LoRA rate and EWC importance steps at another noise: the filter's figure is Opacus' own."""
    history = [(1.1, 128 / 600, 40), (1.1, 16 / 600, 5), (3.0, 16 / 200, 10), (1.1, 128 / 690, 40)]
    ledger = PrivacyLedger(8.0, 1e-5)
    for entry in history:
        ledger.record(*entry)
    ledger.commit_order(4.0)
    reference = fresh_accountant_epsilon(history, 1e-5, 4.0)
    assert ledger.epsilon() == pytest.approx(reference, rel=1e-9)
    ledger.save(tmp_path / "ledger.json")
    assert PrivacyLedger.load(tmp_path / "ledger.json").epsilon() == pytest.approx(reference, rel=1e-9)
    assert ledger.can_afford([]) == (reference <= 8.0)


def test_a_small_budget_stops_the_site_before_it_is_exceeded(tiny_model_dir, csv_dataset, tmp_path):
    flat = run_config(
        tiny_model_dir, csv_dataset, **{"noise-multiplier": 2.0, "target-epsilon": 2.0, "probe-rounds": 10}
    )
    runtime, statuses = runtime_of(flat), []
    for server_round in range(1, 11):
        result = run_round(runtime, server_round, tmp_path)
        statuses.append(result.status)
        assert result.metrics["epsilon"] <= 2.0
    assert statuses[0] == "trained" and statuses[-1] == "skipped"
    assert "privacy budget" in result.reason and result.metrics["stopped-for-budget"] == 1
    assert PrivacyLedger.load(tmp_path / "privacy_ledger.json").epsilon() <= 2.0


def test_a_crafted_server_message_cannot_misprice_a_round(tiny_model_dir, csv_dataset, tmp_path):
    """At ccdc939 phase=probe with plan-probe-rounds=0 was priced at the LoRA rate and trained at the probe rate."""
    flat = run_config(tiny_model_dir, csv_dataset, **{"probe-batch-size": 32})
    runtime = runtime_of(flat)
    refused = run_round(
        runtime,
        4,
        tmp_path,
        round_config={"server-round": 4, "phase": "probe", "plan-probe-rounds": 0, "plan-lora-rounds": 1},
    )
    assert refused.status == "refused" and "'probe'" in refused.reason and "'lora'" in refused.reason
    assert not (tmp_path / "privacy_ledger.json").exists()  # refused before anything ran
    statuses = []
    for _ in range(40):  # a server that replays probe round 1 again and again, with a plan that hides it
        statuses.append(
            run_round(
                runtime,
                1,
                tmp_path,
                round_config={"server-round": 1, "phase": "probe", "plan-probe-rounds": 0, "plan-lora-rounds": 1},
            ).status
        )
    ledger = PrivacyLedger.load(tmp_path / "privacy_ledger.json")
    nominal = len(runtime.data.train)
    assert {rate for _, rate, _ in ledger.history} == {32 / nominal}  # priced at the rate it trained at
    assert statuses[0] == "trained" and ledger.total_steps > 3 * 4  # it kept replaying past the plan...
    sigmas = [sigma for sigma, _, _ in ledger.history]
    assert sigmas == sorted(sigmas) and sigmas[-1] > sigmas[0]  # ...and the site answered with more noise each time
    assert ledger.epsilon() <= 8.0  # the filter holds whatever the server sends


@pytest.mark.parametrize(
    "key, proposal, own", [("dp", False, True), ("target-epsilon", 50.0, 8.0), ("delta", 1e-3, 1e-5)]
)
def test_a_proposal_against_the_sites_policy_is_refused(
    tiny_model_dir, csv_dataset, tmp_path, key, proposal, own, task_identity
):
    from client.app import train

    flat = run_config(tiny_model_dir, csv_dataset, **{key: proposal})
    message = Message(
        content=RecordDict({ARRAYS_RECORD: ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    context = site_context(flat, tmp_path / "state", **{key: own})
    reply = dict(train(message, context).content.config_records[SITE_RECORD])
    assert reply["status"] == "refused"
    assert re.search(
        f"proposes {key} = {re.escape(repr(proposal))} but this site's policy .* says {re.escape(repr(own))}",
        reply["reason"],
    )
    assert not (tmp_path / "state" / "privacy_ledger.json").exists()


def test_a_site_needs_its_own_state_directory_and_never_writes_a_server_path(tiny_model_dir, csv_dataset, tmp_path):
    with pytest.raises(ConfigError, match="state-dir"):
        site_policy({"partition-id": 0, "num-partitions": 2}, environ={})
    flat = run_config(tiny_model_dir, csv_dataset)
    server_path = tmp_path / "server-says"
    result = run_round(
        runtime_of(flat),
        1,
        tmp_path / "own",
        round_config={
            "server-round": 1,
            "run-dir": str(server_path),
            "state-dir": str(server_path),
            "output-dir": str(server_path),
        },
    )
    assert result.status == "trained"
    assert not server_path.exists() and (tmp_path / "own" / "privacy_ledger.json").exists()


def test_a_second_training_on_one_state_directory_is_refused_and_no_spend_is_lost(
    tiny_model_dir, csv_dataset, tmp_path, monkeypatch
):
    import client.site_round as site_round_module

    flat = run_config(tiny_model_dir, csv_dataset)
    runtime, outcomes = runtime_of(flat), {}
    real_probe = site_round_module.run_probe

    def probe_while_another_training_starts(*args, **kwargs):
        if "second" in outcomes:  # the second training itself got this far: no lock stopped it
            return real_probe(*args, **kwargs)

        def second() -> None:
            try:
                outcomes["second"] = run_round(runtime_of(flat), 2, tmp_path)
            except SiteBusyError as err:
                outcomes["second"] = err

        outcomes["second"] = "started"
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(site_round_module, "run_probe", probe_while_another_training_starts)
    first = run_round(runtime, 1, tmp_path)
    monkeypatch.setattr(site_round_module, "run_probe", real_probe)
    assert first.status == "trained" and isinstance(outcomes["second"], SiteBusyError)
    assert "in use by another training" in str(outcomes["second"])
    assert run_round(runtime, 2, tmp_path).status == "trained"  # the lock is released with the round
    assert PrivacyLedger.load(tmp_path / "privacy_ledger.json").total_steps == 2 * 4  # both spends recorded


@pytest.mark.parametrize("noise_multiplier", [0.0, 2.0])
@pytest.mark.parametrize("damage", ["delete", "roll back"])
def test_a_deleted_or_rolled_back_ledger_is_detected(tiny_model_dir, csv_dataset, tmp_path, noise_multiplier, damage):
    flat = run_config(tiny_model_dir, csv_dataset, **{"noise-multiplier": noise_multiplier})
    runtime, ledger = runtime_of(flat), tmp_path / "privacy_ledger.json"
    run_round(runtime, 1, tmp_path)
    shutil.copy(ledger, tmp_path / "backup.json")
    run_round(runtime, 2, tmp_path)
    if damage == "delete":
        ledger.unlink()
    else:
        shutil.copy(tmp_path / "backup.json", ledger)  # a restored backup that misses round 2's spend
    with pytest.raises(LedgerError, match="missing|rolled back"):
        run_round(runtime, 3, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "edit", "garbage"])
def test_a_damaged_ledger_stops_training(tiny_model_dir, csv_dataset, tmp_path, damage):
    flat = run_config(tiny_model_dir, csv_dataset)
    run_round(runtime_of(flat), 1, tmp_path)
    path = tmp_path / "privacy_ledger.json"
    raw = path.read_bytes()
    damaged = {
        "truncate": raw[: len(raw) // 2],
        "edit": raw.replace(b'"history"', b'"history" ', 1).replace(b"4", b"3", 1),
        "garbage": b"\x00\x01not json",
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(LedgerError, match="restore|not a fedcl|checksum|corrupt"):
        run_round(runtime_of(flat), 2, tmp_path)
    assert path.read_bytes() == damaged  # never replaced by a fresh ledger


def test_a_spent_site_declines_rather_than_crashes(tiny_model_dir, csv_dataset, tmp_path):
    flat = run_config(tiny_model_dir, csv_dataset)
    run_round(runtime_of(flat), 1, tmp_path)
    ledger = PrivacyLedger.load(tmp_path / "privacy_ledger.json")
    ledger.record(0.3, 0.5, 500)  # as if the site had spent its whole budget in an earlier run
    ledger.save(tmp_path / "privacy_ledger.json")
    (tmp_path / "noise.json").unlink()
    result = run_round(runtime_of(flat), 2, tmp_path)
    assert result.status == "skipped" and "privacy budget" in result.reason
    assert result.metrics["stopped-for-budget"] == 1


def test_sample_rates_come_from_the_sites_public_nominal_size(tiny_model_dir, csv_dataset, tmp_path):
    flat = run_config(tiny_model_dir, csv_dataset)
    runtime = runtime_of(flat)
    result = run_round(runtime, 1, tmp_path, **{"nominal-records": 400})
    assert result.metrics["sample-rate"] == 8 / 400 and result.metrics["num-examples"] == 400
    assert len(runtime.data.train) != 400  # not the count of its records
    assert PrivacyLedger.load(tmp_path / "privacy_ledger.json").history[0][1:] == (8 / 400, 4)


def test_policy_comes_from_node_config_then_the_launcher_then_site_defaults(tmp_path):
    launcher = json.dumps({"state-root": str(tmp_path), "policy": {"target-epsilon": 3.0, "dp": True}})
    policy = site_policy({"partition-id": 1}, environ={"FEDCL_SIMULATION_SITES": launcher})
    assert policy.state_dir == tmp_path / "site-1" and policy.target_epsilon == 3.0 and policy.delta == 1e-5
    own = site_policy(
        {"partition-id": 1, "state-dir": str(tmp_path / "x"), "target-epsilon": 2.0},
        environ={"FEDCL_SIMULATION_SITES": launcher},
    )
    assert own.state_dir == tmp_path / "x" and own.target_epsilon == 2.0
    assert site_policy({"state-dir": str(tmp_path)}, environ={}).target_epsilon == 8.0


def test_reply_keys_under_dp_are_the_allow_list(tiny_model_dir, csv_dataset, tmp_path, task_identity):
    """Through the ClientApp's own reply: the plain run's probe and LoRA rounds (streams: test_continual_round)."""
    from client.app import train

    flat = run_config(tiny_model_dir, csv_dataset)
    context = site_context(flat, tmp_path / "state")
    expected = TRAINING_REPLY_KEYS
    for server_round in (1, 4):
        message = Message(
            content=RecordDict({ARRAYS_RECORD: ArrayRecord(), "config": ConfigRecord({"server-round": server_round})}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
        reply = train(message, context)
        assert dict(reply.content.config_records[SITE_RECORD])["status"] == "trained"
        keys = set(reply.content.metric_records[METRICS_RECORD])
        assert keys == expected and keys <= DP_TRAIN_METRICS
    assert policy_of(flat, tmp_path / "state").dp


def app_context(flat: dict, state_dir: Path) -> Context:
    return site_context(flat, state_dir)


def app_message(server_round: int, kind: str = MessageType.TRAIN) -> Message:
    config = ConfigRecord({"server-round": server_round})
    return Message(
        content=RecordDict({ARRAYS_RECORD: ArrayRecord(), "config": config}), dst_node_id=1, message_type=kind
    )


def test_another_split_on_the_same_state_directory_is_refused(tiny_model_dir, csv_dataset, tmp_path, task_identity):
    """A server must not turn records the ledger counts as training records into noise-free test records."""
    from client.app import evaluate_global, train

    flat = run_config(tiny_model_dir, csv_dataset)
    assert train(app_message(1), app_context(flat, tmp_path / "state")).content.config_records[SITE_RECORD]
    resplit = {**flat, "seed": 7}  # the launcher hands the virtual site other files
    forget_process_state()
    for reply in (
        train(app_message(2), app_context(resplit, tmp_path / "state")),
        evaluate_global(app_message(2, MessageType.EVALUATE), app_context(resplit, tmp_path / "state")),
    ):
        record = dict(reply.content.config_records[SITE_RECORD])
        assert record["status"] == "refused" and "records differ" in record["reason"]
        assert METRICS_RECORD not in reply.content.metric_records


def test_a_site_that_trained_under_dp_refuses_a_round_without_it(tiny_model_dir, csv_dataset, tmp_path):
    flat = run_config(tiny_model_dir, csv_dataset)
    runtime = runtime_of(flat)
    assert run_round(runtime, 1, tmp_path).status == "trained"
    plain = runtime_of({**flat, "dp": False})
    with pytest.raises(LedgerError, match="has trained under DP"):
        run_round(plain, 2, tmp_path, flat={**flat, "dp": False}, dp=False)
    assert PrivacyLedger.load(tmp_path / "privacy_ledger.json").total_steps == 4  # nothing ran outside the ledger


def test_evaluation_replies_under_dp_carry_only_the_declared_keys(tiny_model_dir, csv_dataset, tmp_path, task_identity):
    from client.app import evaluate_global

    flat = run_config(tiny_model_dir, csv_dataset)
    reply = evaluate_global(app_message(1, MessageType.EVALUATE), app_context(flat, tmp_path / "state"))
    assert set(reply.content.metric_records[METRICS_RECORD]) == {"num-examples", "accuracy", "eval-loss"}
    plain = evaluate_global(
        app_message(1, MessageType.EVALUATE),
        site_context({**flat, "dp": False}, tmp_path / "plain", dp=False),
    )
    assert "eval-seconds" in plain.content.metric_records[METRICS_RECORD]  # timing only without DP


def test_a_replayed_round_of_the_same_run_is_declined(tiny_model_dir, csv_dataset, tmp_path):
    from client.site_round import site_round
    from client.site_state import open_state

    flat = run_config(tiny_model_dir, csv_dataset)
    runtime, policy, state = runtime_of(flat), policy_of(flat, tmp_path), open_state(tmp_path)
    assert site_round(runtime, policy, state, {"server-round": 1}, run_id=5).status == "trained"
    again = site_round(runtime, policy, state, {"server-round": 1}, run_id=5)
    assert again.status == "refused" and "replayed" in again.reason
    assert site_round(runtime, policy, state, {"server-round": 2}, run_id=5).status == "trained"
    assert site_round(runtime, policy, state, {"server-round": 1}, run_id=6).status == "trained"  # a new run
    assert PrivacyLedger.load(tmp_path / "privacy_ledger.json").total_steps == 3 * 4


def test_a_ledger_replaced_by_a_cheaper_one_with_as_many_steps_is_detected(tiny_model_dir, csv_dataset, tmp_path):
    flat = run_config(tiny_model_dir, csv_dataset)
    runtime = runtime_of(flat)
    run_round(runtime, 1, tmp_path)
    run_round(runtime, 2, tmp_path)
    spent = PrivacyLedger.load(tmp_path / "privacy_ledger.json")
    cheaper = PrivacyLedger(
        8.0, 1e-5, [(sigma * 10, rate, steps) for sigma, rate, steps in spent.history], filter_order=spent.filter_order
    )
    assert cheaper.total_steps == spent.total_steps and cheaper.epsilon() < spent.epsilon()
    cheaper.save(tmp_path / "privacy_ledger.json")
    with pytest.raises(LedgerError, match="replaced or rolled back"):
        run_round(runtime, 3, tmp_path)


def test_a_ledger_whose_entries_moved_to_other_record_groups_is_detected(tiny_model_dir, csv_dataset, tmp_path):
    """Same steps, same noise, same sequential total: only the groups changed, so the sentinel's per-group figures catch it."""
    from client.mechanisms import RecordGroups

    flat = run_config(tiny_model_dir, csv_dataset)
    runtime = runtime_of(flat)
    run_round(runtime, 1, tmp_path)
    spent = PrivacyLedger.load(tmp_path / "privacy_ledger.json")
    assert all(groups is not None and groups.partition == "label" for groups in spent.reads)
    moved = PrivacyLedger(
        8.0,
        1e-5,
        list(spent.history),
        filter_order=spent.filter_order,
        reads=[RecordGroups.of("label", ["a label nobody has"]) for _ in spent.history],
    )
    assert moved.total_steps == spent.total_steps
    assert moved.divergence(spent.filter_order) == spent.divergence(spent.filter_order)
    moved.save(tmp_path / "privacy_ledger.json")
    with pytest.raises(LedgerError, match="record group .* lower than the sentinel"):
        run_round(runtime, 2, tmp_path)
