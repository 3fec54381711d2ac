"""Replay buffer: bounded, restart-safe, covers past experiences, class balance, reservoir uniformity."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from client.replay_buffer import BUFFER_FILE, ReplayBuffer, training_pool
from fedcl.run_config import ConfigError

PER_CLASS = 12
CLASSES_PER_EXPERIENCE = 2
EXPERIENCES = 4
LABELS = np.repeat(np.arange(CLASSES_PER_EXPERIENCE * EXPERIENCES), PER_CLASS)  # position p has label LABELS[p]
DATA_SIZE = len(LABELS)


def experience_positions(e: int) -> np.ndarray:
    """Class-incremental: experience e holds classes 2e and 2e+1."""
    return np.flatnonzero(LABELS // CLASSES_PER_EXPERIENCE == e)


def fill(buffer: ReplayBuffer, upto: int = EXPERIENCES) -> ReplayBuffer:
    for e in range(upto):
        buffer.update(experience_positions(e), LABELS[experience_positions(e)], e)
    return buffer


@pytest.mark.parametrize("policy", ["reservoir", "class-balanced"])
def test_never_exceeds_its_size_and_keeps_only_offered_records(policy):
    buffer = ReplayBuffer.create(10, policy, seed=3, data_size=DATA_SIZE)
    offered: set[int] = set()
    for e in range(EXPERIENCES):
        positions = experience_positions(e)
        buffer.update(positions, LABELS[positions], e)
        offered.update(positions.tolist())
        kept = buffer.positions()
        assert len(kept) == len(buffer) == min(10, len(offered))
        assert len(set(kept.tolist())) == len(kept) and set(kept.tolist()) <= offered
        assert all(LABELS[p] == y for p, y in buffer.labels_by_position().items())


@pytest.mark.parametrize("policy", ["reservoir", "class-balanced"])
def test_saved_and_restored_between_experiences_it_ends_exactly_like_an_uninterrupted_one(policy, tmp_path):
    uninterrupted = fill(ReplayBuffer.create(9, policy, seed=5, data_size=DATA_SIZE))
    for e in range(EXPERIENCES):  # a fresh process per experience: load, update, save
        restarted = ReplayBuffer.load(tmp_path, 9, policy, seed=5, data_size=DATA_SIZE)
        restarted.update(experience_positions(e), LABELS[experience_positions(e)], e)
        restarted.save(tmp_path)
    restored = ReplayBuffer.load(tmp_path, 9, policy, seed=5, data_size=DATA_SIZE)
    assert np.array_equal(restored.positions(), uninterrupted.positions())
    assert restored.labels_by_position() == uninterrupted.labels_by_position()
    assert restored.experiences == uninterrupted.experiences == list(range(EXPERIENCES))
    for key, group in uninterrupted.groups.items():
        assert np.array_equal(restored.groups[key].weights, group.weights)
    assert [p.name for p in tmp_path.iterdir()] == [BUFFER_FILE]  # no temporary files left behind


@pytest.mark.parametrize("policy", ["reservoir", "class-balanced"])
@pytest.mark.parametrize("seed", range(5))
def test_holds_examples_from_every_past_experience(policy, seed):
    buffer = ReplayBuffer.create(16, policy, seed=seed, data_size=DATA_SIZE)
    for e in range(EXPERIENCES):
        buffer.update(experience_positions(e), LABELS[experience_positions(e)], e)
        held = {int(LABELS[p]) // CLASSES_PER_EXPERIENCE for p in buffer.positions()}
        assert held == set(range(e + 1))


def test_class_balanced_keeps_every_seen_class_within_one_of_the_others():
    buffer = ReplayBuffer.create(13, "class-balanced", seed=0, data_size=DATA_SIZE)
    for e in range(EXPERIENCES):
        buffer.update(experience_positions(e), LABELS[experience_positions(e)], e)
        counts = Counter(buffer.labels_by_position().values())
        seen = 2 * (e + 1)
        assert sorted(counts) == list(range(seen))
        expected = sorted([13 // seen + (1 if i < 13 % seen else 0) for i in range(seen)])
        assert sorted(counts.values()) == expected  # Avalanche's split: 13 // seen each, remainder to the first


def test_class_balanced_with_known_labels_splits_capacity_over_the_plan_not_the_site():
    buffer = ReplayBuffer.create(12, "class-balanced", seed=0, data_size=DATA_SIZE)
    only_class_0 = np.flatnonzero(LABELS == 0)
    buffer.update(only_class_0, LABELS[only_class_0], 0, known_labels=[0, 1, 2])  # the site lacks 1 and 2
    assert len(buffer) == 4  # 12 // 3 slots for class 0, the rest reserved for the absent classes


def test_reservoir_is_a_uniform_sample_of_everything_offered():
    """Theory: after offering 24 + 72 records, each is kept with probability 8/96, so experience 0 holds 2 on average."""
    from_first = []
    for seed in range(200):
        buffer = ReplayBuffer.create(8, "reservoir", seed=seed, data_size=DATA_SIZE)
        buffer.update(experience_positions(0), LABELS[experience_positions(0)], 0)
        rest = np.flatnonzero(LABELS >= CLASSES_PER_EXPERIENCE)
        buffer.update(rest, LABELS[rest], 1)
        from_first.append(int(np.sum(buffer.positions() < len(experience_positions(0)))))
    mean, standard_error = np.mean(from_first), np.std(from_first) / np.sqrt(len(from_first))
    assert abs(mean - 8 * 24 / 96) < 4 * standard_error


def test_same_seed_same_buffer_other_seed_other_buffer_and_torch_state_untouched():
    torch.manual_seed(99)
    before = torch.get_rng_state()
    first = fill(ReplayBuffer.create(10, "reservoir", seed=1, data_size=DATA_SIZE))
    assert torch.equal(before, torch.get_rng_state())
    again = fill(ReplayBuffer.create(10, "reservoir", seed=1, data_size=DATA_SIZE))
    other = fill(ReplayBuffer.create(10, "reservoir", seed=2, data_size=DATA_SIZE))
    assert np.array_equal(first.positions(), again.positions())
    assert not np.array_equal(first.positions(), other.positions())


def test_an_experience_is_absorbed_once_and_an_empty_one_is_fine():
    buffer = ReplayBuffer.create(10, "reservoir", seed=1, data_size=DATA_SIZE)
    assert buffer.update(experience_positions(0), LABELS[experience_positions(0)], 0)
    kept = buffer.positions()
    assert not buffer.update(experience_positions(0), LABELS[experience_positions(0)], 0)  # a retried round
    assert np.array_equal(buffer.positions(), kept)
    assert buffer.update(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 1)
    assert np.array_equal(buffer.positions(), kept)


def test_bad_settings_and_offers_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="has only 96 training records; use replay-size <= 96"):
        ReplayBuffer.create(500, "reservoir", seed=0, data_size=DATA_SIZE)
    with pytest.raises(ConfigError, match="replay-policy"):
        ReplayBuffer.create(10, "herding", seed=0, data_size=DATA_SIZE)
    with pytest.raises(ConfigError, match="replay-size"):
        ReplayBuffer.create(0, "reservoir", seed=0, data_size=DATA_SIZE)
    buffer = ReplayBuffer.create(10, "reservoir", seed=0, data_size=DATA_SIZE)
    with pytest.raises(ValueError, match="rows of the site's train split"):
        buffer.update(np.array([0, DATA_SIZE]), np.array([0, 0]), 0)
    with pytest.raises(ValueError, match="one label per position"):
        buffer.update(np.array([0, 1]), np.array([0]), 0)
    with pytest.raises(ValueError, match="positions repeat"):
        buffer.update(np.array([1, 1]), np.array([0, 0]), 0)
    fill(buffer, 1).save(tmp_path)
    with pytest.raises(ValueError, match="restore those settings, or delete the file"):
        ReplayBuffer.load(tmp_path, 20, "reservoir", seed=0, data_size=DATA_SIZE)


def test_training_pool_lists_each_record_once():
    buffer = fill(ReplayBuffer.create(6, "reservoir", seed=0, data_size=DATA_SIZE), upto=2)
    current = experience_positions(2)
    pool = training_pool(np.concatenate([current, buffer.positions()[:2]]), buffer)
    assert pool.tolist() == sorted(set(current.tolist()) | set(buffer.positions().tolist()))
    assert training_pool(current, None).tolist() == current.tolist()
