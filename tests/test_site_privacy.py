"""A site's privacy over its life: restarts, the hard stop, a damaged or lost ledger."""

from pathlib import Path

import numpy as np
import pytest

from client import site_runtime as runtime_module
from client import site_trainer
from client.privacy_ledger import LedgerError, PrivacyLedger, compute_epsilon
from client.site_runtime import site_runtime
from client.site_state import site_state
from client.site_trainer import RoundInstructions, train_round
from fedcl import model_factory
from fedcl.model_factory import set_trainable_arrays

WORDS = ["market", "shares", "goal", "match", "vote", "party", "film", "music", "phone", "chip"]


@pytest.fixture()
def csv_dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    lines = ["text,label"]
    for i in range(120):
        label = i % 5
        words = [WORDS[2 * label + int(rng.integers(2))] for _ in range(6)]
        lines.append(f"{' '.join(words)},topic{label}")
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_config(model_dir: Path, dataset: Path, **overrides) -> dict:
    flat = {"model": str(model_dir), "dataset": str(dataset), "num-sites": 2, "max-length": 16, "probe-rounds": 3,
            "probe-steps": 4, "probe-batch-size": 8, "num-rounds": 2, "local-steps": 2, "batch-size": 8,
            "target-epsilon": 8.0, "partition": "iid"}
    flat.update(overrides)
    return flat


def fresh_process(monkeypatch) -> None:
    """Forget everything held in memory, as a restarted site process would."""
    monkeypatch.setattr(model_factory, "_CACHE", {})
    monkeypatch.setattr(runtime_module, "_DATASETS", {})
    monkeypatch.setattr(runtime_module, "_ENCODED", {})
    monkeypatch.setattr(site_trainer, "_FEATURES", {})


def one_round(flat: dict, run_dir: Path, server_round: int, probe_rounds: int = 3, lora_rounds: int = 2):
    runtime = site_runtime(flat, {"partition-id": 0, "num-partitions": 2})
    set_trainable_arrays(runtime.adapter.model, runtime.adapter.initial_state)
    state = site_state({}, str(run_dir), runtime.data.name)
    if server_round <= probe_rounds:
        instructions = RoundInstructions(server_round, "probe", probe_rounds - server_round + 1, lora_rounds)
    else:
        instructions = RoundInstructions(server_round, "lora", 0, probe_rounds + lora_rounds - server_round + 1)
    return train_round(runtime, instructions, state), state


def test_epsilon_continues_across_a_restart(tiny_model_dir, csv_dataset, tmp_path, monkeypatch):
    flat = run_config(tiny_model_dir, csv_dataset)
    epsilons = []
    for server_round in (1, 2):
        result, state = one_round(flat, tmp_path, server_round)
        epsilons.append(result.metrics["epsilon"])
    fresh_process(monkeypatch)  # the site's process dies; only its state directory remains
    for server_round in (3, 4, 5):
        result, state = one_round(flat, tmp_path, server_round)
        epsilons.append(result.metrics["epsilon"])
    assert all(b > a for a, b in zip(epsilons, epsilons[1:]))  # never reset
    ledger = PrivacyLedger.load(state.ledger)
    assert ledger.total_steps == 3 * 4 + 2 * 2
    recomputed = compute_epsilon(ledger.history, 1e-5, "prv")
    assert epsilons[-1] == pytest.approx(recomputed, rel=0.01)
    assert epsilons[-1] <= 8.0


def test_small_budget_stops_the_site_before_it_is_exceeded(tiny_model_dir, csv_dataset, tmp_path):
    flat = run_config(tiny_model_dir, csv_dataset, **{"noise-multiplier": 2.0, "target-epsilon": 2.0,
                                                      "probe-rounds": 10})
    statuses, last_epsilon = [], 0.0
    for server_round in range(1, 11):
        result, state = one_round(flat, tmp_path, server_round, probe_rounds=10)
        statuses.append(result.status)
        last_epsilon = result.metrics["epsilon"]
        assert last_epsilon <= 2.0
    assert statuses[:5] == ["trained"] * 5 and statuses[-1] == "skipped"  # 5 rounds of 4 steps fit in epsilon 2
    assert "privacy budget" in result.reason and result.metrics["stopped-for-budget"] == 1
    assert PrivacyLedger.load(state.ledger).epsilon() <= 2.0


@pytest.mark.parametrize("damage", ["truncate", "edit", "garbage"])
def test_a_damaged_ledger_stops_training(tiny_model_dir, csv_dataset, tmp_path, damage):
    flat = run_config(tiny_model_dir, csv_dataset)
    _, state = one_round(flat, tmp_path, 1)
    raw = state.ledger.read_bytes()
    damaged = {"truncate": raw[: len(raw) // 2], "edit": raw.replace(b'"history"', b'"history" ', 1).replace(b"4", b"3", 1),
               "garbage": b"\x00\x01not json"}[damage]
    state.ledger.write_bytes(damaged)
    with pytest.raises(LedgerError, match="restore|not a fedcl|checksum|corrupt"):
        one_round(flat, tmp_path, 2)
    assert state.ledger.read_bytes() == damaged  # never replaced by a fresh ledger


def test_a_lost_ledger_is_not_recreated(tiny_model_dir, csv_dataset, tmp_path):
    flat = run_config(tiny_model_dir, csv_dataset)
    _, state = one_round(flat, tmp_path, 1)
    state.ledger.unlink()
    with pytest.raises(LedgerError, match="missing"):
        one_round(flat, tmp_path, 2)
    assert not state.ledger.exists()


def test_a_spent_site_declines_rather_than_crashes(tiny_model_dir, csv_dataset, tmp_path):
    flat = run_config(tiny_model_dir, csv_dataset)
    _, state = one_round(flat, tmp_path, 1)
    ledger = PrivacyLedger.load(state.ledger)
    ledger.record(0.3, 0.5, 500)  # as if the site had spent its whole budget elsewhere in the plan
    ledger.save(state.ledger)
    state.noise_plan.unlink()  # force a new calibration: nothing can fit any more
    result, _ = one_round(flat, tmp_path, 2)
    assert result.status == "skipped" and "privacy budget" in result.reason
    assert result.metrics["stopped-for-budget"] == 1
