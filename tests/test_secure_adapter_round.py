"""Probe and LoRA rounds under secure aggregation: the server unmasks the example-weighted mean, never a site's tensors.

Three virtual sites (tiny random BERT, BBC News) answer the four stages
through the ClientApp's own handlers (``client/app.py``); the server is the
run's ``SiteStrategy`` (``server/strategy_setup.py``). The references are
computed here from what each site would have sent in a plain round (its
trained tensors, captured) with numpy's weighted mean, and from a plain run's
ledger, never from the server's output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from secure_helpers import NODES, RecordingGrid, site_answers
from site_helpers import forget_process_state, virtual_site

from client.privacy_ledger import PrivacyLedger
from client.secure_update import NO_GLOBAL_TENSORS
from fedcl.protocol import METRICS_RECORD, SECAGG_RECORD
from fedcl.run_config import parse_run_config
from fedcl.secure_adapter import UPDATE_WEIGHT, VALUE_BOUND, adapter_scale
from server.initial_arrays import initial_arrays
from simulations.run import pyproject_defaults

NOMINAL = {NODES[0]: 20, NODES[1]: 40, NODES[2]: 60}  # unequal public sizes: the weights show in the mean


def flat_config(model_dir, **keys) -> dict:
    return {
        **pyproject_defaults(),
        "model": str(model_dir),
        "num-sites": 3,
        "recipe": "probe-then-lora",
        "probe-rounds": 1,
        "probe-steps": 2,
        "probe-batch-size": 8,
        "num-rounds": 1,
        "local-steps": 2,
        "batch-size": 8,
        "max-length": 32,
        "max-train-examples": 60,
        "max-test-examples": 20,
        "partition": "iid",
        "secure-aggregation": True,
        **keys,
    }


class Captured:
    """Each site's trained tensors (what a plain reply would carry) and its unmasked words, by node."""

    def __init__(self, monkeypatch) -> None:
        import client.secure_update as secure_update
        import client.site_handlers as site_handlers

        self.tensors: dict[int, dict[str, np.ndarray]] = {}
        self.words: dict[int, np.ndarray] = {}
        self.node = 0
        real_update, real_words = site_handlers.masked_update, secure_update.weighted_words

        def masked_update(trained, received, weight, secure, rng=None):
            self.tensors[self.node] = {name: np.array(a, dtype=np.float64) for name, a in trained.items()}
            return real_update(trained, received, weight, secure, rng)

        def weighted_words(arrays, weight, scale, rng):
            self.words[self.node] = real_words(arrays, weight, scale, rng)
            return self.words[self.node]

        monkeypatch.setattr(site_handlers, "masked_update", masked_update)
        monkeypatch.setattr(secure_update, "weighted_words", weighted_words)


def run_rounds(flat, grid, rounds=(1,), start=None):
    """The run's own strategy (``server/strategy_setup.py``), driven through ``rounds`` (train only).

    It starts from ``start``, by default what the ServerApp starts a fresh run from (``server/initial_arrays.py``).
    """
    from server.initial_arrays import initial_arrays
    from server.strategy_setup import build_strategy

    config = parse_run_config(virtual_site(flat)[0])  # with the public label set, as the ServerApp receives it
    strategy = build_strategy(config, lambda r: {})
    strategy.current = dict(initial_arrays(config) if start is None else start)
    strategy.poll_seconds = 0.01
    for server_round in rounds:
        train = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        strategy.aggregate_train(server_round, grid.send_and_receive(train))
    return strategy


def weighted_reference(captured: Captured, nodes) -> dict[str, np.ndarray]:
    """numpy's example-weighted mean of the nodes' trained tensors: the plain FedAvg of the same replies."""
    names = captured.tensors[nodes[0]]
    return {
        name: np.average([captured.tensors[n][name] for n in nodes], axis=0, weights=[NOMINAL[n] for n in nodes])
        for name in names
    }


def per_site_nominal() -> dict[int, dict]:
    return {node: {"nominal-records": size} for node, size in NOMINAL.items()}


def test_the_server_unmasks_the_example_weighted_mean_of_the_sites_tensors_and_sees_only_masked_words(
    tiny_model_dir, tmp_path, task_identity, monkeypatch
):
    flat = flat_config(tiny_model_dir)
    forget_process_state()
    captured = Captured(monkeypatch)
    answers, _ = site_answers(flat, tmp_path, captured, per_site=per_site_nominal())
    grid = RecordingGrid(answers)
    strategy = run_rounds(flat, grid)
    assert 1 not in strategy.round_failures, strategy.round_failures
    assert sorted(captured.tensors) == list(NODES)

    # The server's view: int64 words in [0, 2**bits), none of them a site's own words; no per-site size.
    bits = strategy.secure.bits
    trained = [r for r in grid.received if r.content.array_records]
    assert len(trained) == 3
    for reply in trained:
        assert "num-examples" not in reply.content.metric_records.get(METRICS_RECORD, {})
        record = reply.content.array_records["arrays"]
        assert UPDATE_WEIGHT in record
        flat_words = np.concatenate([record[name].numpy().reshape(-1) for name in sorted(record)])
        assert flat_words.dtype == np.int64 and flat_words.min() >= 0 and flat_words.max() < 2**bits
        weight = int(record[UPDATE_WEIGHT].numpy()[0])
        assert weight not in NOMINAL.values()  # masked too
        for words in captured.words.values():
            assert not np.array_equal(np.sort(flat_words), np.sort(words))

    # The run's byte counts hold the protocol's records too: summed here from what crossed the grid, per node, by
    # Flower's own ConfigRecord.count_bytes (which raises on an empty list: such an entry counts its key only).
    def flower_bytes(record) -> int:
        empty = [key for key, value in record.items() if value == [] or value in ("", b"")]
        return ConfigRecord({k: v for k, v in record.items() if k not in empty}).count_bytes() + sum(map(len, empty))

    for reply in strategy.train_replies[1]:
        own = [m for m in grid.received if int(m.metadata.src_node_id) == reply.node]
        arrays = sum(record.count_bytes() for m in own for record in m.content.array_records.values())
        protocol = sum(
            flower_bytes(m.content.config_records[SECAGG_RECORD])
            for m in own
            if SECAGG_RECORD in m.content.config_records
        )
        down = sum(
            flower_bytes(m.content.config_records[SECAGG_RECORD])
            for m in grid.sent
            if int(m.metadata.dst_node_id) == reply.node and SECAGG_RECORD in m.content.config_records
        )
        assert (reply.bytes_up, reply.protocol_bytes_down) == (arrays + protocol, down)
        assert arrays > 0 and protocol > 0 and down > 0

    # The aggregate: numpy's weighted mean of what each site would have sent in the clear, to the rounding's error.
    reference = weighted_reference(captured, NODES)
    scale = adapter_scale(3, 60)
    assert set(strategy.current) == set(reference)
    for name, expected in reference.items():
        assert np.abs(strategy.current[name] - expected).max() <= 2.0 / scale + 1e-6 * np.abs(expected).max(), name
    seeded = initial_arrays(parse_run_config(virtual_site(flat)[0]))
    lora = [name for name in seeded if "lora_" in name]
    assert lora and all(np.array_equal(strategy.current[name], seeded[name]) for name in lora)  # a probe round: exact
    assert not all(np.array_equal(strategy.current[name], seeded[name]) for name in seeded)  # the head moved
    unweighted = {name: np.mean([captured.tensors[n][name] for n in NODES], axis=0) for name in reference}
    gap = max(np.abs(unweighted[name] - reference[name]).max() for name in reference)
    assert gap > 1e3 / scale  # the weights matter: the unweighted mean is far from the one the server holds


def test_a_site_lost_after_masking_leaves_the_weighted_mean_of_the_others_and_with_n_h_3_the_round_fails(
    tiny_model_dir, tmp_path, task_identity, monkeypatch
):
    flat = flat_config(tiny_model_dir, **{"secagg-min-honest": 2, "min-replies": 2})
    forget_process_state()
    captured = Captured(monkeypatch)
    answers, _ = site_answers(flat, tmp_path / "two", captured, drop_train=NODES[2], per_site=per_site_nominal())
    strategy = run_rounds(flat, RecordingGrid(answers))
    assert 1 not in strategy.round_failures, strategy.round_failures
    reference = weighted_reference(captured, NODES[:2])
    with_lost = weighted_reference(captured, NODES)
    scale = adapter_scale(3, 60)
    for name, expected in reference.items():
        assert np.abs(strategy.current[name] - expected).max() <= 2.0 / scale + 1e-6 * np.abs(expected).max(), name
    assert max(np.abs(strategy.current[n] - with_lost[n]).max() for n in reference) > 1e3 / scale

    flat = flat_config(tiny_model_dir, **{"min-replies": 2})  # n_h = 3: two survivors are too few
    answers, _ = site_answers(flat, tmp_path / "three", drop_train=NODES[2])
    strategy = run_rounds(flat, RecordingGrid(answers))
    assert "secure aggregation" in strategy.round_failures[1]
    seeded = initial_arrays(parse_run_config(virtual_site(flat)[0]))
    assert all(np.array_equal(strategy.current[name], seeded[name]) for name in seeded)  # the model stays as it was


def test_a_site_whose_message_carries_no_global_tensors_refuses_before_it_spends(
    tiny_model_dir, tmp_path, task_identity
):
    flat = flat_config(tiny_model_dir)
    answers, _ = site_answers(flat, tmp_path)
    strategy = run_rounds(flat, RecordingGrid(answers), start={})
    assert "training" in strategy.round_failures[1] or "secure" in strategy.round_failures[1]
    replies = strategy.train_replies[1]
    assert {r.status for r in replies} == {"refused"} and all(NO_GLOBAL_TENSORS in r.reason for r in replies)
    for i in range(3):
        ledger = tmp_path / f"site-{i}" / "privacy_ledger.json"
        assert not ledger.exists() or not PrivacyLedger.load(ledger).history


def test_each_site_spends_exactly_what_the_plain_round_spends_its_full_local_noise(
    tiny_model_dir, tmp_path, task_identity
):
    """Secure aggregation does not lower the DP-SGD noise: the ledgers of a secure and a plain run are the same.

    Each entry is checked by hand too: the sample rate is the batch over the
    site's public nominal size, the steps the run's probe-steps plus local-steps.
    """
    ledgers = {}
    for secure in (True, False):
        flat = flat_config(tiny_model_dir, **{"secure-aggregation": secure})
        forget_process_state()
        answers, _ = site_answers(flat, tmp_path / str(secure), per_site=per_site_nominal())
        strategy = run_rounds(flat, RecordingGrid(answers), rounds=(1, 2))
        assert not strategy.round_failures, strategy.round_failures
        ledgers[secure] = [
            PrivacyLedger.load(tmp_path / str(secure) / f"site-{i}" / "privacy_ledger.json").history for i in range(3)
        ]
    assert ledgers[True] == ledgers[False]
    for i, size in enumerate(NOMINAL.values()):  # probe and LoRA at one rate and level: one entry, 2 + 2 steps
        ((sigma, rate, steps, *_),) = ledgers[True][i]
        assert (rate, steps) == (pytest.approx(8 / size), 4)
        assert sigma > 0.6  # the level the site's budget calibrated for its plan, not divided by sqrt(3)


def test_rounding_is_unbiased_within_one_unit_and_values_past_the_bound_are_clamped():
    from client.secure_update import weighted_words

    rng = np.random.default_rng(0)
    theta = {"b": np.array([0.3, -1.7, 1e-7, VALUE_BOUND * 3]), "a": np.array([[-VALUE_BOUND * 2, 0.0]])}
    scale, weight = 2.0**10, 7
    exact = np.array([-VALUE_BOUND, 0.0, 0.3, -1.7, 1e-7, VALUE_BOUND]) * scale * weight  # a first, clamped
    draws = np.array([weighted_words(theta, weight, scale, rng) for _ in range(4000)])
    assert np.all(draws[:, -1] == weight)  # the weight word, last
    body = draws[:, :-1].astype(np.float64)
    assert np.all(np.abs(body - exact) < 1.0)
    assert np.allclose(body.mean(axis=0), exact, atol=4 * 0.5 / math.sqrt(len(draws)))


def test_the_scale_leaves_no_room_to_wrap_by_hand():
    # 3 sites of at most 60 records, 62-bit words: 2**61 / 180 / 64 = 2**47.5..., so S = 2**47
    assert adapter_scale(3, 60) == 2.0**47
    assert 3 * 60 * (VALUE_BOUND * 2.0**47 + 1) + 3 * 60 < 2**61
    with pytest.raises(ValueError, match="declare max-train-examples"):
        adapter_scale(10_000, 0)  # 10**9 records assumed per site: too little precision left


def test_a_malformed_release_is_left_out_of_the_sum_and_its_reply_marked_rejected(
    tiny_model_dir, tmp_path, task_identity, monkeypatch
):
    flat = flat_config(tiny_model_dir, **{"secagg-min-honest": 2, "min-replies": 2})
    forget_process_state()
    captured = Captured(monkeypatch)
    answers, _ = site_answers(flat, tmp_path, captured, per_site=per_site_nominal())
    honest = answers[NODES[2]]

    def without_weight(message):  # the site's words arrive without their weight word: malformed
        reply = honest(message)
        if reply is not None and reply.content.array_records:
            del reply.content.array_records["arrays"][UPDATE_WEIGHT]
        return reply

    answers[NODES[2]] = without_weight
    strategy = run_rounds(flat, RecordingGrid(answers))
    assert 1 not in strategy.round_failures, strategy.round_failures
    status = {r.node: r.status for r in strategy.train_replies[1]}
    assert status == {NODES[0]: "trained", NODES[1]: "trained", NODES[2]: "rejected"}
    reference = weighted_reference(captured, NODES[:2])
    scale = adapter_scale(3, 60)
    for name, expected in reference.items():
        assert np.abs(strategy.current[name] - expected).max() <= 2.0 / scale + 1e-6 * np.abs(expected).max(), name


def test_a_weight_above_the_declared_bound_and_a_missing_tensor_are_refused_with_fixed_reasons():
    from client.secure_release import BitWidthError, SecureRound
    from client.secure_update import (
        MISSING_GLOBAL_TENSORS,
        WEIGHT_TOO_LARGE,
        SecureUpdateError,
        check_global_tensors,
        update_scale,
    )

    secure = SecureRound(3, 3, 60, 62, lambda words: words)
    assert update_scale(60, secure) == adapter_scale(3, 60)
    with pytest.raises(BitWidthError, match=WEIGHT_TOO_LARGE[:40]):
        update_scale(61, secure)  # a nominal size above max-train-examples could wrap the sum
    with pytest.raises(SecureUpdateError, match=MISSING_GLOBAL_TENSORS[:40]):
        check_global_tensors({"a": np.zeros(2)}, ["a", "b"])
    check_global_tensors({"a": np.zeros(2), "b": np.zeros(1)}, ["a", "b"])  # every trained tensor came: no error


def test_ffa_masks_b_and_the_head_only_and_a_stays_the_seeded_one(tiny_model_dir, tmp_path, task_identity, monkeypatch):
    flat = flat_config(tiny_model_dir, strategy="ffa")
    forget_process_state()
    captured = Captured(monkeypatch)
    answers, _ = site_answers(flat, tmp_path, captured, per_site=per_site_nominal())
    grid = RecordingGrid(answers)
    strategy = run_rounds(flat, grid, rounds=(1, 2))  # a probe round, then a LoRA round (B trains)
    assert not strategy.round_failures, strategy.round_failures
    seeded = initial_arrays(parse_run_config(virtual_site(flat)[0]))
    frozen = [name for name in seeded if "lora_A" in name]
    assert frozen and all(np.array_equal(strategy.current[name], seeded[name]) for name in frozen)
    for reply in grid.received:  # A never travels back: only B and the head are masked
        for record in reply.content.array_records.values():
            assert not any("lora_A" in name for name in record)
    reference = weighted_reference(captured, NODES)  # round 2's B and head, what plain FFA replies would carry
    assert not any("lora_A" in name for name in reference)
    scale = adapter_scale(3, 60)
    for name, expected in reference.items():
        assert np.abs(strategy.current[name] - expected).max() <= 2.0 / scale + 1e-6 * np.abs(expected).max(), name
    lora_b = [name for name in reference if "lora_B" in name]
    assert lora_b and any(np.abs(strategy.current[name]).max() > 0 for name in lora_b)  # B trained from zero
