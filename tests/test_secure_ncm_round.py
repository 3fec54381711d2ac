"""The ncm release under secure aggregation, wired: real site handlers answer a scripted grid's four stages.

Three virtual sites (tiny random BERT, BBC News, a few records) answer the
server's key, share, masked-release and unmask messages through the
ClientApp's own functions (``client/app.py``); the server is the run's
``SiteStrategy`` (``server/strategy_setup.py``). The references are computed
here from what the sites quantised (captured), never from the server's output.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_grid import ScriptedGrid
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from secure_helpers import NODES, RecordingGrid, site_answers
from site_helpers import forget_process_state, site_context

from client.distributed_noise import gaussian_equivalent_steps
from client.privacy_ledger import PrivacyLedger
from client.secure_stages import TOO_FEW_HONEST
from fedcl.protocol import (
    CONFIG_RECORD,
    MASKED_SUMS,
    METRICS_RECORD,
    NOISE_VARIANCE,
    SECAGG_RECORD,
    SERVER_ROUND,
    SITE_RECORD,
)
from fedcl.run_config import ConfigError, parse_run_config
from fedcl.secure_ncm import SCALE, norm_bound
from fedcl.secure_quantization import from_modular
from simulations.run import pyproject_defaults

ROOT = Path(__file__).resolve().parent.parent


def flat_config(model_dir, **keys) -> dict:
    return {
        **pyproject_defaults(),
        "model": str(model_dir),
        "num-sites": 3,
        "recipe": "ncm",
        "max-length": 32,
        "max-train-examples": 40,
        "max-test-examples": 20,
        "partition": "iid",
        "secure-aggregation": True,
        **keys,
    }


class Captured:
    """What each site quantised (its integer class sums before noise), by node."""

    def __init__(self, monkeypatch) -> None:
        import client.phases as phases
        import client.secure_release as secure_release

        self.sums: dict[int, np.ndarray] = {}
        self.local_sigma: dict[int, float] = {}
        self.noise_multiplier: dict[int, float] = {}  # z: the common level each site released at
        self.node = 0
        real_quantize, real_sums = secure_release.quantize_records, phases.secure_class_sums
        last: dict = {}

        def quantize(*args, **kwargs):
            last["ints"] = real_quantize(*args, **kwargs)
            return last["ints"]

        def class_sums(rows, labels, num_classes, release, rng):
            out = real_sums(rows, labels, num_classes, release, rng)
            plain = np.zeros((num_classes, release.dim), dtype=np.int64)
            np.add.at(plain, np.asarray(labels, dtype=np.int64), last["ints"])  # by hand, from the site's own ints
            self.sums[self.node], self.local_sigma[self.node] = plain, release.local_sigma
            self.noise_multiplier[self.node] = release.noise_multiplier
            return out

        monkeypatch.setattr(secure_release, "quantize_records", quantize)
        monkeypatch.setattr(phases, "secure_class_sums", class_sums)


def run_one_round(flat, grid, rounds=(1,)):
    """The run's own strategy for the ncm recipe (``server/strategy_setup.py``), driven through ``rounds``."""
    from server.strategy_setup import build_strategy
    from strategies.ncm_aggregator import ClassSumAggregator

    config = parse_run_config(flat)
    strategy = build_strategy(config, lambda r: {"phase": "ncm"}, aggregator=ClassSumAggregator())
    strategy.poll_seconds = 0.01
    for server_round in rounds:
        train = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        strategy.aggregate_train(server_round, grid.send_and_receive(train))
    return strategy


def accuracy(strategy, grid) -> float | None:
    evaluate = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid))
    metrics = strategy.aggregate_evaluate(1, grid.send_and_receive(evaluate))
    return None if metrics is None else float(metrics["accuracy"])


def test_the_server_sees_only_masked_words_and_unmasks_the_sum_of_the_sites_quantised_sums_plus_noise(
    tiny_model_dir, tmp_path, task_identity, monkeypatch
):
    import client.secure_stages as secure_stages

    flat = flat_config(tiny_model_dir)
    forget_process_state()
    captured = Captured(monkeypatch)
    secrets, modes, real_save = [], set(), secure_stages.save_protocol_state

    def save(path, protocol):
        real_save(path, protocol)
        secrets.extend([protocol.secrets.enc_private_key, protocol.secrets.mask_private_key, protocol.secrets.seed])
        modes.add((path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777))

    monkeypatch.setattr(secure_stages, "save_protocol_state", save)
    answers, _ = site_answers(flat, tmp_path / "secure", captured)
    grid = RecordingGrid(answers)
    strategy = run_one_round(flat, grid)
    assert 1 not in strategy.round_failures, strategy.round_failures
    assert sorted(captured.sums) == list(NODES)
    assert modes == {(0o600, 0o700)} and secrets  # the protocol state: the site's user only, written every stage
    for reply in grid.received:  # no secret of any site's state in anything the server received
        assert set(reply.content.config_records) <= {SITE_RECORD, SECAGG_RECORD}
        for record in reply.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    assert not any(isinstance(item, bytes) and secret in item for secret in secrets)

    # The server's view: every array it received is a masked word block or a public noise variance.
    bits = strategy.secure.bits
    for reply in grid.received:
        assert "num-examples" not in reply.content.metric_records.get(METRICS_RECORD, {})
        for record in reply.content.array_records.values():
            assert set(record) <= {MASKED_SUMS, NOISE_VARIANCE}
            if MASKED_SUMS not in record:
                continue
            words = record[MASKED_SUMS].numpy()
            assert words.dtype == np.int64 and words.min() >= 0 and words.max() < 2**bits
            for true in captured.sums.values():
                assert not np.array_equal(words, true)
                centred = from_modular(words, bits).astype(np.float64).reshape(-1)
                for seen in (words.astype(np.float64).reshape(-1), centred):
                    assert abs(np.corrcoef(seen, true.reshape(-1).astype(np.float64))[0, 1]) < 0.35

    # The aggregate: the plain sum of the sites' own quantised sums, plus noise of the documented std.
    released = np.flatnonzero(np.abs(strategy.current["class-sums"]).sum(axis=1) > 0)
    reference = sum(captured.sums.values()) / SCALE
    difference = (strategy.current["class-sums"] - reference)[released]
    local = next(iter(captured.local_sigma.values()))
    expected_std = math.sqrt(len(NODES)) * local / SCALE
    assert abs(difference.mean()) < 4 * expected_std / math.sqrt(difference.size)
    assert 0.8 * expected_std < difference.std() < 1.2 * expected_std
    assert np.allclose(strategy.current["noise-variance"][released], len(NODES) * (local / SCALE) ** 2)
    # n_h = 3 of 3: the sum's noise std is the budget's z times the sensitivity, the same as one Gaussian release
    z = captured.noise_multiplier[NODES[0]]
    assert len(set(captured.noise_multiplier.values())) == 1  # one common level at every site
    assert not (tmp_path / "secure" / "site-0" / "noise.json").exists()  # a secure round never writes the hint
    dim = strategy.current["class-sums"].shape[1]
    assert expected_std == pytest.approx(z * norm_bound(dim) / SCALE, rel=1e-6)

    # Accuracy: close to the same sites' non-secure release.
    secure_accuracy = accuracy(strategy, grid)
    plain_flat = flat_config(tiny_model_dir, **{"secure-aggregation": False})
    plain_answers, _ = site_answers(plain_flat, tmp_path / "plain")
    plain_grid = ScriptedGrid(plain_answers)
    plain_accuracy = accuracy(run_one_round(plain_flat, plain_grid), plain_grid)
    assert secure_accuracy is not None and plain_accuracy is not None
    assert abs(secure_accuracy - plain_accuracy) <= 0.2, (secure_accuracy, plain_accuracy)


def test_the_ledger_entry_is_gaussian_equivalent_steps_by_hand_and_the_state_file_is_gone(
    tiny_model_dir, tmp_path, task_identity, monkeypatch
):
    flat = flat_config(tiny_model_dir, **{"secagg-min-honest": 2, "min-replies": 2})
    forget_process_state()
    captured = Captured(monkeypatch)
    answers, _ = site_answers(flat, tmp_path, captured)
    strategy = run_one_round(flat, RecordingGrid(answers))
    assert 1 not in strategy.round_failures, strategy.round_failures
    folder = tmp_path / "site-0"
    z = captured.noise_multiplier[NODES[0]]
    dim = strategy.current["class-sums"].shape[1]
    classes = len(parse_run_config(site_context(flat, folder).run_config).label_names)
    bound = norm_bound(dim)
    local = z * bound / math.sqrt(2) * (1 + 1e-9)  # n_h = 2: each site adds 1/sqrt(2) of the noise
    assert captured.local_sigma[NODES[0]] == pytest.approx(local, rel=1e-12)
    entry = gaussian_equivalent_steps(bound, local, 2, classes * dim)
    ledger = PrivacyLedger.load(folder / "privacy_ledger.json")
    assert ledger.history == [(entry.noise_multiplier, 1.0, 1)]
    assert entry.noise_multiplier >= z
    assert not list((folder / "secagg").glob("*.state"))  # removed after the unmask answer


def test_a_site_lost_after_masking_leaves_the_sum_of_the_others_and_with_n_h_3_the_round_fails(
    tiny_model_dir, tmp_path, task_identity, monkeypatch
):
    from client.app import secagg_unmask
    from fedcl.secure_aggregation import UnmaskRequest

    # n_h = 2, a round may go on with 2 sites: the sum is the two survivors'.
    flat = flat_config(tiny_model_dir, **{"secagg-min-honest": 2, "min-replies": 2})
    forget_process_state()
    captured = Captured(monkeypatch)
    answers, _ = site_answers(flat, tmp_path / "two", captured, drop_train=NODES[2])
    strategy = run_one_round(flat, RecordingGrid(answers))
    assert 1 not in strategy.round_failures, strategy.round_failures
    released = np.flatnonzero(np.abs(strategy.current["class-sums"]).sum(axis=1) > 0)
    survivors = (captured.sums[NODES[0]] + captured.sums[NODES[1]]) / SCALE
    difference = (strategy.current["class-sums"] - survivors)[released]
    expected_std = math.sqrt(2) * captured.local_sigma[NODES[0]] / SCALE
    assert 0.75 * expected_std < difference.std() < 1.25 * expected_std
    with_lost = (sum(captured.sums.values()) / SCALE)[released]
    assert np.abs(strategy.current["class-sums"][released] - with_lost).max() > 5 * expected_std  # not in the sum

    # n_h = 3: the server fails the round, and the survivors themselves refuse to unmask two sites' sum.
    flat = flat_config(tiny_model_dir, **{"min-replies": 2})
    answers, contexts = site_answers(flat, tmp_path / "three", drop_train=NODES[2])
    strategy = run_one_round(flat, RecordingGrid(answers))
    assert "secure aggregation" in strategy.round_failures[1] and not strategy.updated_rounds
    assert "class-sums" not in strategy.current
    request = RecordDict(
        {
            CONFIG_RECORD: ConfigRecord({SERVER_ROUND: 1}),
            SECAGG_RECORD: ConfigRecord(UnmaskRequest([NODES[0], NODES[1]], [NODES[2]]).to_dict()),
        }
    )
    for node in NODES[:2]:
        message = Message(content=request, dst_node_id=node, message_type=f"{MessageType.TRAIN}.secagg_unmask")
        reply = secagg_unmask(message, contexts[node])
        site = dict(reply.content.config_records[SITE_RECORD])
        assert (site["status"], site["reason"]) == ("refused", TOO_FEW_HONEST)
        assert SECAGG_RECORD not in reply.content.config_records


def test_a_site_whose_own_minimum_is_above_the_runs_refuses_from_the_first_stage(
    tiny_model_dir, tmp_path, task_identity
):
    flat = flat_config(tiny_model_dir, **{"secagg-min-honest": 2, "min-replies": 2})
    answers, _ = site_answers(flat, tmp_path, **{"secagg-min-honest": 3})
    strategy = run_one_round(flat, RecordingGrid(answers))
    assert "secure aggregation" in strategy.round_failures[1]
    replies = strategy.train_replies[1]
    assert {r.status for r in replies} == {"refused"} and all(TOO_FEW_HONEST in r.reason for r in replies)


def test_a_stream_releases_each_experience_at_one_common_noise_level_and_a_site_with_history_refuses(
    tiny_model_dir, tmp_path, task_identity
):
    flat = flat_config(tiny_model_dir, stream="class-incremental", **{"num-experiences": 2})
    forget_process_state()
    answers, contexts = site_answers(flat, tmp_path)
    strategy = run_one_round(flat, RecordingGrid(answers), rounds=(1, 2))
    assert not strategy.round_failures and strategy.updated_rounds == {1, 2}
    ledgers = [PrivacyLedger.load(tmp_path / f"site-{i}" / "privacy_ledger.json") for i in range(3)]
    assert all(len(ledger.history) == 2 for ledger in ledgers)
    assert len({ledger.history[1] for ledger in ledgers}) == 1  # one noise level at every site, both experiences
    assert ledgers[0].history[0] == ledgers[0].history[1]
    assert np.count_nonzero(np.abs(strategy.current["class-sums"]).sum(axis=1)) == len(strategy.current["class-sums"])

    # A later run on the same state directories: experience 0's records were released already, so the common
    # noise level no longer fits these sites' budgets; each stops for its budget rather than add less noise.
    for context in contexts.values():
        context.run_id = 2
    again = run_one_round(flat, RecordingGrid(answers))
    assert not again.updated_rounds and "class-sums" not in again.current
    assert {r.status for r in again.train_replies[1]} == {"skipped"}
    assert all(r.reason.startswith("privacy budget:") for r in again.train_replies[1])


def test_a_refused_experience_leaves_the_noise_hint_alone_and_the_next_experience_is_taken_by_every_site(
    tiny_model_dir, tmp_path, task_identity
):
    """The reviewer's reproduction (C1): one budget refusal must not raise the level a site uses for good."""
    flat = flat_config(tiny_model_dir, stream="class-incremental", **{"num-experiences": 2})
    forget_process_state()
    answers, contexts = site_answers(flat, tmp_path)
    hints = [tmp_path / f"site-{i}" / "noise.json" for i in range(3)]
    first = run_one_round(flat, RecordingGrid(answers), rounds=(1,))  # experience 0 only
    assert 1 not in first.round_failures, first.round_failures
    assert not any(hint.exists() for hint in hints)
    hints[0].write_text(json.dumps({"noise_multiplier": 0.123}))  # as if a plain calibration had left one

    for context in contexts.values():
        context.run_id = 2
    again = run_one_round(flat, RecordingGrid(answers), rounds=(1, 2))
    # round 1 re-releases experience 0: its records' budget is spent, every site stops for its budget
    assert {r.status for r in again.train_replies[1]} == {"skipped"} and 1 not in again.updated_rounds
    assert all(r.reason.startswith("privacy budget:") for r in again.train_replies[1])
    # round 2 releases experience 1 (other records): every site takes part at the common level
    assert 2 not in again.round_failures, again.round_failures
    assert {r.status for r in again.train_replies[2]} == {"trained"} and len(again.train_replies[2]) == 3
    ledgers = [PrivacyLedger.load(tmp_path / f"site-{i}" / "privacy_ledger.json") for i in range(3)]
    assert all(len(ledger.history) == 2 for ledger in ledgers)
    assert len({ledger.history[1] for ledger in ledgers}) == 1
    assert json.loads(hints[0].read_text()) == {"noise_multiplier": 0.123}  # unchanged by every secure round
    assert not hints[1].exists() and not hints[2].exists()


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"recipe": "probe-then-lora", "strategy": "exact"}, "sums the sites' tensor changes"),
        ({"recipe": "lora", "num-sites": 10000, "secagg-min-honest": 2}, "declare max-train-examples"),
        ({"compression": "int8"}, "masked integers cannot be compressed"),
        ({"robust": "clip", "max-update-norm": 1.0}, "no per-site check or robust rule"),
        ({"dp": False}, "distributed DP noise"),
        ({"secagg-min-honest": 4}, "secagg-min-honest"),
        ({"secagg-min-honest": 1}, "secagg-min-honest"),
        ({"num-sites": 1, "secagg-min-honest": 0}, "at least 2 sites"),
    ],
)
def test_the_run_config_refuses_what_secure_aggregation_cannot_run_with(keys, match):
    flat = {**pyproject_defaults(), "recipe": "ncm", "num-sites": 3, "secure-aggregation": True, **keys}
    with pytest.raises(ConfigError, match=match):
        parse_run_config(flat)


def test_the_defaults_are_off_and_every_site():
    config = parse_run_config(pyproject_defaults())
    assert (config.secure_aggregation, config.secagg_min_honest) == (False, 0)
    assert parse_run_config({"num-sites": 5, "recipe": "ncm", "secure-aggregation": True}).honest_sites == 5


@pytest.mark.integration
@pytest.mark.slow
def test_a_secure_ncm_simulation_completes_with_the_accuracy_of_the_plain_one(tmp_path):
    """``python -m simulations.run`` with the shipped MiniLM (random tiny BERT features are at chance for any NCM)."""
    results = {}
    for secure in ("true", "false"):
        run_dir = tmp_path / f"run-{secure}"
        overrides = (
            "num-sites=3 recipe='ncm' max-length=32 max-train-examples=60 max-test-examples=20 partition='iid' "
            f"secure-aggregation={secure} output-dir='{run_dir}'"
        )
        done = subprocess.run(
            [sys.executable, "-m", "simulations.run", "--run-config", overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        unmasked = "secure aggregation: the sum of 3 sites unmasked" in (run_dir / "flower.log").read_text()
        assert unmasked == (secure == "true")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        sites = [r for r in rows if "site" in r]
        assert {r["train_status"] for r in sites} == {"trained"} and len(sites) == 3
        assert all((r["train_examples"] is None) == (secure == "true") for r in sites)  # no size beside a secure sum
        results[secure] = float(json.loads((run_dir / "summary.json").read_text())["accuracy"])
    # Measured: 0.85 secure, 0.80 plain (5 classes, chance 0.2); the secure sum carries sqrt(3) times less noise.
    assert results["false"] > 0.5 and results["true"] >= results["false"] - 0.1, results
