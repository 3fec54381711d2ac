"""Replay buffer: Bernoulli membership by HMAC of the record's content, add/remove-one neighbours, restart, key file."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat

import numpy as np
import pytest
import torch

from client.replay_buffer import (
    BUFFER_FILE,
    KEY_FILE,
    REPLAY_POLICIES,
    ReplayBuffer,
    check_replay_settings,
    record_ids,
    training_pool,
)
from client.state_files import save_arrays
from fedcl.run_config import ConfigError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
LENGTH = 6  # tokens per row


def with_key(folder, key: bytes = KEY):
    """A state folder whose replay key is ``key`` (written before the first load, so load must read it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KEY_FILE).write_bytes(key)
    return folder


def kept_by_hand(key: bytes, record_id: bytes, probability: float) -> bool:
    """The membership rule recomputed independently: the first 8 bytes of HMAC-SHA256, top 53 bits, / 2**53."""
    digest = hmac.new(key, record_id, hashlib.sha256).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53 < probability


def dataset(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct records: token rows and labels."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 30_000, size=(n, LENGTH))
    tokens[:, 0] = np.arange(n)  # distinct content
    return tokens, rng.integers(0, 5, size=n)


def kept_contents(buffer: ReplayBuffer, tokens: np.ndarray, labels: np.ndarray) -> set[bytes]:
    """The buffer as a set of record contents (positions differ between neighbouring datasets)."""
    ids = record_ids(tokens, labels)
    return {ids[p] for p in buffer.positions()}


def test_record_ids_are_token_bytes_then_label_and_depend_on_content_only():
    tokens = np.array([[101, 7, 0], [101, 7, 0], [101, 8, 0]])
    ids = record_ids(torch.tensor(tokens), torch.tensor([2, 3, 2]))
    by_hand = b"".join(value.to_bytes(8, "little") for value in (101, 7, 0, 2))  # tokens, then the label
    assert ids[0] == by_hand
    assert ids[0] != ids[1]  # same tokens, other label
    assert record_ids(tokens[[0]], [2]) == [ids[0]]  # same content at another position: same id
    assert record_ids(tokens.astype(np.int32), np.array([2, 3, 2])) == ids  # dtype does not matter
    assert ids[2] != ids[0]
    with pytest.raises(ValueError, match="one label per row"):
        record_ids(tokens, [1, 2])


def test_membership_is_the_hmac_of_the_content_below_the_probability(tmp_path):
    tokens, labels = dataset(400)
    buffer = ReplayBuffer.load(with_key(tmp_path), 0.25)
    ids = record_ids(tokens, labels)
    assert buffer.update(np.arange(400), ids, 0)
    expected = [p for p in range(400) if kept_by_hand(KEY, ids[p], 0.25)]
    assert buffer.positions().tolist() == expected
    assert len(buffer) == len(expected) and 0 < len(expected) < 400
    assert buffer.experiences == [0]


@pytest.mark.parametrize("where", [0, 137, 300])
def test_adding_one_record_changes_only_that_records_membership(tmp_path, where):
    tokens, labels = dataset(300)
    ids = record_ids(tokens, labels)
    extra_kept = extra_dropped = None
    for candidate in range(10_000, 10_100):  # a new record that is kept, and one that is not, found by hand
        row = np.full((1, LENGTH), candidate)
        if kept_by_hand(KEY, record_ids(row, [1])[0], 0.3):
            extra_kept = extra_kept if extra_kept is not None else row
        else:
            extra_dropped = extra_dropped if extra_dropped is not None else row
    assert extra_kept is not None and extra_dropped is not None

    base = ReplayBuffer.load(with_key(tmp_path / "base"), 0.3)
    base.update(np.arange(300), ids, 0)
    base_contents = kept_contents(base, tokens, labels)
    assert base_contents == {i for i in ids if kept_by_hand(KEY, i, 0.3)}
    for extra, kept in ((extra_kept, True), (extra_dropped, False)):
        # the neighbour: the extra record inserted at `where`, shifting the positions of every later record
        tokens2, labels2 = np.insert(tokens, where, extra[0], axis=0), np.insert(labels, where, 1)
        neighbour = ReplayBuffer.load(with_key(tmp_path / f"neighbour-{kept}-{where}"), 0.3)
        neighbour.update(np.arange(301), record_ids(tokens2, labels2), 0)
        difference = kept_contents(neighbour, tokens2, labels2) ^ base_contents
        assert difference == ({record_ids(extra, [1])[0]} if kept else set())


def test_adding_a_record_to_one_experience_leaves_the_other_experiences_alone(tmp_path):
    tokens, labels = dataset(200)
    ids = record_ids(tokens, labels)
    first = ReplayBuffer.load(with_key(tmp_path / "a"), 0.5)
    first.update(np.arange(100), ids[:100], 0)
    first.update(np.arange(100, 200), ids[100:], 1)
    second = ReplayBuffer.load(with_key(tmp_path / "b"), 0.5)
    second.update(np.arange(99), ids[:99], 0)  # experience 0 without its last record
    second.update(np.arange(100, 200), ids[100:], 1)
    assert set(second.positions().tolist()) == set(first.positions().tolist()) - {99}
    later = [p for p in first.positions().tolist() if p >= 100]
    assert [p for p in second.positions().tolist() if p >= 100] == later


def test_fraction_kept_is_within_binomial_bounds(tmp_path):
    n, probability = 20_000, 0.3
    tokens, labels = dataset(n, seed=4)
    buffer = ReplayBuffer.load(with_key(tmp_path), probability)
    buffer.update(np.arange(n), record_ids(tokens, labels), 0)
    sd = np.sqrt(n * probability * (1 - probability))  # 64.8
    assert abs(len(buffer) - n * probability) < 5 * sd
    everything = ReplayBuffer.load(with_key(tmp_path / "all"), 1.0)
    everything.update(np.arange(n), record_ids(tokens, labels), 0)
    assert len(everything) == n  # probability 1 keeps every record


def test_membership_is_the_same_after_save_and_load(tmp_path):
    tokens, labels = dataset(300)
    ids = record_ids(tokens, labels)
    experiences = [np.arange(0, 100), np.arange(100, 250), np.arange(250, 300)]
    uninterrupted = ReplayBuffer.load(tmp_path, 0.4)  # creates the key
    for e, rows in enumerate(experiences):
        uninterrupted.update(rows, [ids[p] for p in rows], e)
    key = (tmp_path / KEY_FILE).read_bytes()
    for e, rows in enumerate(experiences):  # a fresh process per experience: load, update, save
        restarted = ReplayBuffer.load(tmp_path, 0.4)
        restarted.update(rows, [ids[p] for p in rows], e)
        restarted.save(tmp_path)
    restored = ReplayBuffer.load(tmp_path, 0.4)
    assert (tmp_path / KEY_FILE).read_bytes() == key  # created once, read afterwards
    assert restored.positions().tolist() == uninterrupted.positions().tolist()
    assert restored.positions().tolist() == [p for p in range(300) if kept_by_hand(key, ids[p], 0.4)]
    assert restored.experiences == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([BUFFER_FILE, KEY_FILE])  # no temporary files


def test_the_key_is_32_secret_bytes_readable_by_the_owner_only(tmp_path):
    ReplayBuffer.load(tmp_path / "a", 0.5)
    ReplayBuffer.load(tmp_path / "b", 0.5)
    first, second = (tmp_path / "a" / KEY_FILE), (tmp_path / "b" / KEY_FILE)
    assert len(first.read_bytes()) == 32 and first.read_bytes() != second.read_bytes()
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    shown = repr(ReplayBuffer.load(tmp_path / "a", 0.5))
    assert "key=" not in shown and repr(first.read_bytes()) not in shown  # the key is never logged
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / KEY_FILE).write_bytes(b"short")
    with pytest.raises(ValueError, match="not a 32-byte replay key"):
        ReplayBuffer.load(tmp_path / "c", 0.5)


def test_different_keys_give_different_buffers(tmp_path):
    tokens, labels = dataset(300)
    ids = record_ids(tokens, labels)
    one = ReplayBuffer.load(with_key(tmp_path / "one", KEY), 0.5)
    other = ReplayBuffer.load(with_key(tmp_path / "other", OTHER_KEY), 0.5)
    one.update(np.arange(300), ids, 0)
    other.update(np.arange(300), ids, 0)
    assert one.positions().tolist() != other.positions().tolist()
    assert other.positions().tolist() == [p for p in range(300) if kept_by_hand(OTHER_KEY, ids[p], 0.5)]


def test_an_experience_is_absorbed_once_and_an_empty_one_is_fine(tmp_path):
    tokens, labels = dataset(100)
    ids = record_ids(tokens, labels)
    buffer = ReplayBuffer.load(with_key(tmp_path), 0.5)
    assert buffer.update(np.arange(50), ids[:50], 0)
    kept = buffer.positions()
    assert not buffer.update(np.arange(50, 100), ids[50:], 0)  # a retried round, even with other records
    assert buffer.positions().tolist() == kept.tolist() and buffer.experiences == [0]
    assert buffer.update(np.array([], dtype=np.int64), [], 1)
    assert buffer.positions().tolist() == kept.tolist() and buffer.experiences == [0, 1]
    buffer.save(tmp_path)
    assert not ReplayBuffer.load(tmp_path, 0.5).update(np.arange(50), ids[:50], 0)  # also after a restart


def test_load_refuses_another_probability_another_key_or_an_old_file(tmp_path):
    tokens, labels = dataset(20)
    buffer = ReplayBuffer.load(with_key(tmp_path), 0.5)
    buffer.update(np.arange(20), record_ids(tokens, labels), 0)
    buffer.save(tmp_path)
    assert ReplayBuffer.load(tmp_path, 0.5).positions().tolist() == buffer.positions().tolist()
    with pytest.raises(ValueError, match="inclusion probability 0.5.*restore the replay settings.*or delete"):
        ReplayBuffer.load(tmp_path, 0.25)
    (tmp_path / KEY_FILE).write_bytes(OTHER_KEY)
    with pytest.raises(ValueError, match="another replay key.*restore that key file"):
        ReplayBuffer.load(tmp_path, 0.5)
    old = tmp_path / "old"
    save_arrays(
        old / BUFFER_FILE,
        {"group.0.positions": np.arange(3)},
        {"fedcl": json.dumps({"format": "fedcl-replay-buffer", "version": 1})},
    )
    with pytest.raises(ValueError, match="not a fedcl replay buffer of version 2.*delete it"):
        ReplayBuffer.load(old, 0.5)


@pytest.mark.parametrize("probability", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_a_probability_outside_zero_one_is_refused(tmp_path, probability):
    with pytest.raises(ValueError, match=r"use a number in \(0, 1\]"):
        ReplayBuffer.load(tmp_path, probability)


def test_bad_offers_are_refused_with_the_fix(tmp_path):
    ids = record_ids(*dataset(3))
    buffer = ReplayBuffer.load(with_key(tmp_path), 0.5)
    with pytest.raises(ValueError, match="one id per position"):
        buffer.update(np.array([0, 1]), ids, 0)
    with pytest.raises(ValueError, match="positions repeat"):
        buffer.update(np.array([1, 1, 2]), ids, 0)
    with pytest.raises(ValueError, match="negative"):
        buffer.update(np.array([-1, 1, 2]), ids, 0)
    with pytest.raises(ValueError, match="must be bytes"):
        buffer.update(np.array([0, 1, 2]), ["a", "b", "c"], 0)
    with pytest.raises(ValueError, match="whole number >= 0"):
        buffer.update(np.array([0, 1, 2]), ids, -1)
    assert len(buffer) == 0 and buffer.experiences == []


def test_replay_settings_are_checked():
    assert REPLAY_POLICIES == ("bernoulli",)
    check_replay_settings(10, "bernoulli", 96)
    with pytest.raises(ConfigError, match="replay-policy.*use one of bernoulli"):
        check_replay_settings(10, "reservoir", 96)
    with pytest.raises(ConfigError, match="replay-size.*whole number >= 1"):
        check_replay_settings(0, "bernoulli", 96)
    with pytest.raises(ConfigError, match="has only 96 training records; use replay-size <= 96"):
        check_replay_settings(500, "bernoulli", 96, "site 0")


def test_training_pool_lists_each_record_once(tmp_path):
    tokens, labels = dataset(100)
    buffer = ReplayBuffer.load(with_key(tmp_path), 0.5)
    buffer.update(np.arange(50), record_ids(tokens[:50], labels[:50]), 0)
    current = np.arange(50, 100)
    pool = training_pool(np.concatenate([current, buffer.positions()[:2]]), buffer)
    assert pool.tolist() == sorted(set(current.tolist()) | set(buffer.positions().tolist()))
    assert training_pool(current, None).tolist() == current.tolist()
