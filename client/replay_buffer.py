"""A site's replay buffer: which of its own past training records it keeps, by Avalanche's storage policies.

The buffer holds up to ``replay-size`` positions into the site's train split
(rows of its encoded tensors) with their labels. It is updated once per
experience, after the site's last round of that experience, with that
experience's training positions; while experience ``e`` trains, the buffer
holds records of experiences ``< e`` only.

Policies (run-config key ``replay-policy``), both Avalanche 0.6 storage
policies driven outside any strategy through ``update_from_dataset`` on a tiny
``AvalancheDataset`` over (position, label) tensors:

- ``reservoir`` (``ReservoirSamplingBuffer``): every record ever offered gets
  a uniform random weight; the buffer keeps the ``replay-size`` largest, i.e. a
  uniform sample of all records seen so far. Each past experience is held in
  proportion to its size (in expectation: a tiny experience can lose all its
  records to chance).
- ``class-balanced`` (``ClassBalancedBuffer``, adaptive size): one reservoir
  per class, capacity split evenly over the classes seen so far (remainder to
  the first ones). Every seen class keeps ``replay-size // classes`` records
  (or all it has), so in a class-incremental stream every past experience is
  represented as long as ``replay-size`` is at least the number of classes.

Reproducible and model-free: each update draws its weights from torch's
generator seeded with ``(seed, experience)`` (the global torch random state is
restored afterwards), and the rule sees only positions and labels, never the
model.

Persistence: Avalanche's buffers have no state_dict, so the state is kept as
plain arrays (positions, labels, reservoir weights per group, the classes seen
in Avalanche's order, the group capacities) in ``replay_buffer.safetensors``
in the site's state folder, written atomically. Before an update the
Avalanche buffer is rebuilt from that state; the reservoir weights go back
into ``ReservoirSamplingBuffer._buffer_weights`` (the only private field
touched; avalanche-lib is pinned at 0.6.0 and a test checks that a buffer
saved and restored between updates ends exactly where an uninterrupted one
does). Reading the buffer (:meth:`ReplayBuffer.positions`) needs no Avalanche.

Privacy: the buffer only decides which of the site's own records are kept;
the records are used only inside DP-SGD, sampled with Poisson sampling from
:func:`training_pool` (the current experience plus the buffer, each record
once), so the site's ledger covers them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from client.state_files import load_arrays, save_arrays
from fedcl.run_config import ConfigError

REPLAY_POLICIES = ("reservoir", "class-balanced")
BUFFER_FILE = "replay_buffer.safetensors"
_FORMAT = "fedcl-replay-buffer"
_VERSION = 1


@dataclass
class _Group:
    """One Avalanche reservoir: positions, labels, weights (descending) and its capacity."""

    positions: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    capacity: int


@dataclass
class ReplayBuffer:
    """Positions (into the site's train split) kept for replay, with their labels.

    Build with :meth:`create` or :meth:`load`; change only through :meth:`update`.
    """

    capacity: int
    policy: str
    seed: int
    data_size: int
    groups: dict[int, _Group] = field(default_factory=dict)  # reservoir: {0: ...}; class-balanced: {label: ...}
    seen_classes: list[int] = field(default_factory=list)  # class-balanced: Avalanche's seen_classes, in its order
    experiences: list[int] = field(default_factory=list)  # experiences already absorbed, in order

    @classmethod
    def create(cls, capacity: int, policy: str, seed: int, data_size: int, site: str = "this site") -> "ReplayBuffer":
        """An empty buffer, after checking the settings against the site's data size.

        Raises :class:`ConfigError` (a ``ValueError``) for a non-positive size,
        an unknown policy, or a size larger than the site's training data.
        """
        check_replay_settings(capacity, policy, data_size, site)
        return cls(capacity, policy, seed, data_size)

    def __len__(self) -> int:
        return sum(len(g.positions) for g in self.groups.values())

    def positions(self) -> np.ndarray:
        """Sorted positions of the kept records (rows of the site's train split)."""
        kept = [g.positions for g in self.groups.values()]
        return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)

    def labels_by_position(self) -> dict[int, int]:
        """Label of every kept record, keyed by position."""
        return {int(p): int(y) for g in self.groups.values() for p, y in zip(g.positions, g.labels)}

    def update(
        self,
        positions: np.ndarray,
        labels: np.ndarray,
        experience: int,
        known_labels: Iterable[int] | None = None,
    ) -> bool:
        """Offer one experience's training records to the policy; call once, after its last round.

        ``positions`` are rows of the site's train split, ``labels`` their
        labels. An experience already absorbed is ignored (returns False), so a
        retried round cannot offer the same records twice. ``known_labels``
        (class-balanced only): labels that count as seen even if this site has
        none of them (e.g. the experience's labels from the global plan), which
        makes the capacity split independent of which labels the site holds.
        Returns True when the experience was absorbed.
        """
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self._check_offer(positions, labels, experience)
        if experience in self.experiences:
            return False
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_update_seed(self.seed, experience))
            policy = self._to_avalanche()
            offered = _avalanche_dataset(positions, labels)
            if self.policy == "class-balanced" and known_labels is not None:
                for label in known_labels:
                    policy.seen_classes.add(int(label))
            policy.update_from_dataset(offered)
        self._from_avalanche(policy)
        self.experiences.append(int(experience))
        return True

    def save(self, state_dir: str | os.PathLike[str]) -> Path:
        """Write the buffer to ``state_dir/replay_buffer.safetensors`` atomically; returns the path."""
        arrays: dict[str, np.ndarray] = {}
        for key, group in self.groups.items():
            arrays[f"group.{key}.positions"] = group.positions.astype(np.int64)
            arrays[f"group.{key}.labels"] = group.labels.astype(np.int64)
            arrays[f"group.{key}.weights"] = group.weights.astype(np.float32)
        meta = {
            "format": _FORMAT, "version": _VERSION, "policy": self.policy, "capacity": self.capacity,
            "seed": self.seed, "data_size": self.data_size, "experiences": self.experiences,
            "seen_classes": self.seen_classes, "group_capacity": {str(k): g.capacity for k, g in self.groups.items()},
        }
        path = Path(state_dir) / BUFFER_FILE
        save_arrays(path, arrays, {"fedcl": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str], capacity: int, policy: str, seed: int, data_size: int,
             site: str = "this site") -> "ReplayBuffer":
        """The buffer saved in ``state_dir``, or a fresh empty one if there is none.

        Raises ``ValueError`` when the saved buffer was built with other
        settings (size, policy, seed, data size) than the ones given.
        """
        path = Path(state_dir) / BUFFER_FILE
        if not path.exists():
            return cls.create(capacity, policy, seed, data_size, site)
        arrays, raw = load_arrays(path)
        meta = json.loads(raw.get("fedcl", "{}"))
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise ValueError(f"{path} is not a fedcl replay buffer (version {_VERSION}); delete it to start afresh")
        saved = (meta["capacity"], meta["policy"], meta["seed"], meta["data_size"])
        if saved != (capacity, policy, seed, data_size):
            raise ValueError(
                f"{path} holds a buffer built with replay-size {saved[0]}, replay-policy {saved[1]!r}, seed {saved[2]}, "
                f"{saved[3]} training records; this run asks for {capacity}, {policy!r}, {seed}, {data_size}: restore "
                "those settings, or delete the file to start the buffer afresh"
            )
        buffer = cls.create(capacity, policy, seed, data_size, site)
        for key, group_capacity in meta["group_capacity"].items():
            buffer.groups[int(key)] = _Group(arrays[f"group.{key}.positions"], arrays[f"group.{key}.labels"],
                                             arrays[f"group.{key}.weights"], int(group_capacity))
        buffer.seen_classes = [int(c) for c in meta["seen_classes"]]
        buffer.experiences = [int(e) for e in meta["experiences"]]
        return buffer

    def _check_offer(self, positions: np.ndarray, labels: np.ndarray, experience: int) -> None:
        if isinstance(experience, bool) or not isinstance(experience, (int, np.integer)) or experience < 0:
            raise ValueError(f"experience {experience!r}: use the experience's index, a whole number >= 0")
        if len(positions) != len(labels):
            raise ValueError(f"{len(positions)} positions but {len(labels)} labels; give one label per position")
        if len(positions) and (positions.min() < 0 or positions.max() >= self.data_size):
            raise ValueError(
                f"positions must be rows of the site's train split, 0 .. {self.data_size - 1}; got "
                f"{positions.min()} .. {positions.max()} (pass SiteExperience.train, not dataset indices)"
            )
        if len(np.unique(positions)) != len(positions):
            raise ValueError("positions repeat; offer each training record once")

    def _to_avalanche(self) -> Any:
        """Rebuild Avalanche's storage policy from the saved arrays."""
        import torch
        from avalanche.training.storage_policy import ClassBalancedBuffer, ReservoirSamplingBuffer

        def reservoir(group: _Group) -> Any:
            buffer = ReservoirSamplingBuffer(group.capacity)
            buffer.buffer = _avalanche_dataset(group.positions, group.labels)
            buffer._buffer_weights = torch.from_numpy(group.weights.astype(np.float32))  # no public setter
            return buffer

        if self.policy == "reservoir":
            return reservoir(self.groups[0]) if 0 in self.groups else ReservoirSamplingBuffer(self.capacity)
        policy = ClassBalancedBuffer(self.capacity, adaptive_size=True)
        for label in self.seen_classes:  # same insertion order, same set
            policy.seen_classes.add(label)
        for label, group in self.groups.items():
            policy.buffer_groups[label] = reservoir(group)
        return policy

    def _from_avalanche(self, policy: Any) -> None:
        """Read positions, labels and weights back out of Avalanche's buffers."""
        if self.policy == "reservoir":
            self.groups = {0: _read_reservoir(policy)}
            return
        self.seen_classes = [int(c) for c in policy.seen_classes]
        self.groups = {int(label): _read_reservoir(buffer) for label, buffer in policy.buffer_groups.items()}


def check_replay_settings(capacity: int, policy: str, data_size: int, site: str = "this site") -> None:
    """Reject replay settings that cannot work for a site with ``data_size`` training records."""
    if policy not in REPLAY_POLICIES:
        raise ConfigError(f"config key 'replay-policy' = {policy!r}: use one of {', '.join(REPLAY_POLICIES)}")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ConfigError(f"config key 'replay-size' = {capacity!r}: use a whole number >= 1 (or 0 to turn replay off)")
    if capacity > data_size:
        raise ConfigError(
            f"config key 'replay-size' = {capacity}: {site} has only {data_size} training records; "
            f"use replay-size <= {data_size} (or 0 for no replay)"
        )


def training_pool(current: np.ndarray, buffer: ReplayBuffer | None) -> np.ndarray:
    """The positions DP-SGD samples from this round: the current experience plus the buffer, each once.

    A record in both (possible in domain-incremental streams only if an
    experience is offered twice) appears once: a record listed twice could be
    drawn twice into one Poisson batch and double its influence beyond the
    clipping bound the accountant assumes.
    """
    current = np.asarray(current, dtype=np.int64)
    return np.union1d(current, buffer.positions()) if buffer is not None else np.unique(current)


def _update_seed(seed: int, experience: int) -> int:
    """A 63-bit torch seed from (seed, experience), stable across platforms."""
    return int(np.random.SeedSequence([int(seed), int(experience)]).generate_state(2, dtype=np.uint64)[0] >> 1)


def _avalanche_dataset(positions: np.ndarray, labels: np.ndarray) -> Any:
    """An AvalancheDataset whose items are (position, label) and whose ``targets`` are the labels."""
    import torch
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.benchmarks.utils.data_attribute import DataAttribute
    from torch.utils.data import TensorDataset

    x = torch.as_tensor(np.asarray(positions, dtype=np.int64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return AvalancheDataset([TensorDataset(x, y)], data_attributes=[DataAttribute(y.tolist(), "targets")])


def _read_reservoir(buffer: Any) -> _Group:
    items = [buffer.buffer[i] for i in range(len(buffer.buffer))]
    positions = np.array([int(item[0]) for item in items], dtype=np.int64)
    labels = np.array([int(item[1]) for item in items], dtype=np.int64)
    weights = buffer._buffer_weights.numpy().astype(np.float32, copy=True)
    return _Group(positions, labels, weights, int(buffer.max_size))
