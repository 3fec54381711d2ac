"""A site's replay buffer: which of its own past training records it keeps, one independent Bernoulli draw per record.

What is kept: positions (rows of the site's train split) of past training
records. The buffer absorbs each experience once, after the site's last round
of it; while experience ``e`` trains, the buffer holds records of experiences
``< e`` only. A record offered to the buffer is kept iff

    u(record) = HMAC-SHA256(site_key, record_id) read as a number in [0, 1)  <  inclusion_probability

where ``record_id`` identifies the record by its content (:func:`record_ids`:
its token ids and label), never by its position, and ``site_key`` is a secret
of the site (32 random bytes in ``replay.key`` in its state folder, created on
first use, mode 0600). The inclusion probability is data-independent: the
caller computes it from public values (run config, public plan) and this
module only checks that it lies in (0, 1]. Expected size: inclusion
probability x records offered (Binomial; there is no capacity, so the size is
not capped, and a record is never evicted once kept).

Why this is add/remove-one-record DP: given the key, each record's membership
is a function of that record alone, so for neighbouring datasets ``D`` and
``D + {x}`` the buffers are either identical (``x`` not kept) or differ in
``x`` only: the training pool (:func:`training_pool`) of ``D + {x}`` is a
neighbour of the pool of ``D``. The buffer's records are used only inside
DP-SGD, which Poisson-samples that pool and whose ledger counts every step
they are in, so the DP-SGD guarantee for neighbouring pools is the guarantee
for neighbouring datasets. (No amplification from the Bernoulli selection is
claimed, none is needed.) Two records with identical content share an id and
hence a membership; that still changes no other record's membership.

Why not Avalanche's storage policies (used here before): reservoir sampling
keeps the ``k`` records with the largest random weights, and the
class-balanced buffer splits its capacity over the classes seen. Which record
is kept then depends on its position in the stream and on its rank among the
other records: adding one record shifts the weights drawn for the others (a
seeded RNG by position) and can evict another record. Neighbouring datasets
then give buffers that differ in many records, which breaks the add/remove
claim (group privacy over the whole buffer gives a vacuous delta).

Persistence: ``replay_buffer.safetensors`` (kept positions, absorbed
experiences; metadata: format, version, inclusion probability, and a check
value of the key so that a buffer is never continued under another key),
written atomically. Loading with another inclusion probability is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client.mechanisms import RecordGroups
from client.state_files import load_arrays, save_arrays, write_atomic
from fedcl.run_config import ConfigError

REPLAY_POLICIES = ("bernoulli",)
BUFFER_FILE = "replay_buffer.safetensors"
KEY_FILE = "replay.key"
KEY_BYTES = 32  # 256-bit HMAC-SHA256 key: a brute-force search of the key space is out of reach
_FORMAT = "fedcl-replay-buffer"
_VERSION = 3  # 3: records the record groups it holds; 2 (read: groups unknown); 1 was Avalanche's reservoir
_READABLE = (2, _VERSION)
_KEY_CHECK_LABEL = b"fedcl replay key check"


@dataclass
class ReplayBuffer:
    """Positions (into the site's train split) kept for replay; each record kept with ``inclusion_probability``.

    Build with :meth:`load` (which reads or creates the site's key); change
    only through :meth:`update`.
    """

    inclusion_probability: float
    key: bytes = field(repr=False)  # the site's secret; never logged
    kept: set[int] = field(default_factory=set)
    experiences: list[int] = field(default_factory=list)  # experiences already absorbed, in order
    # (partition, cell) of every record group it was offered (public: the plan's); None: unknown (a version-2
    # buffer, or an offer without groups), i.e. it may hold any record. A replay round reads these groups too.
    held: set[tuple[str, str]] | None = field(default_factory=set)

    def __post_init__(self) -> None:
        check_inclusion_probability(self.inclusion_probability)
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"the replay key must be {KEY_BYTES} bytes; build the buffer with ReplayBuffer.load")

    def __len__(self) -> int:
        return len(self.kept)

    def positions(self) -> np.ndarray:
        """Sorted positions of the kept records (rows of the site's train split), int64."""
        return np.array(sorted(self.kept), dtype=np.int64)

    def update(
        self, positions: np.ndarray, record_ids: Sequence[bytes], experience: int, groups: RecordGroups | None = None
    ) -> bool:
        """Offer one experience's training records; call once per experience, after its last round.

        ``positions`` are rows of the site's train split; ``record_ids[i]`` is
        the content id of the record at ``positions[i]`` (:func:`record_ids`).
        Each record is kept iff its HMAC value is below the inclusion
        probability, whatever else is offered. ``groups``: the record groups
        of the experience (the plan's public cells), remembered in
        :attr:`held`; without them the buffer may hold any record. An experience already absorbed
        is ignored (returns False), so a retried round cannot offer its
        records twice. Returns True when the experience was absorbed.
        Raises ``ValueError`` for a negative or non-integer experience, a
        length mismatch, negative or repeated positions, or an id that is not bytes.
        """
        positions = np.asarray(positions).reshape(-1)
        _check_offer(positions, record_ids, experience)
        if int(experience) in self.experiences:
            return False
        if groups is None or self.held is None:  # unknown groups: from now on the buffer may hold any record
            self.held = None
        else:
            self.held.update((groups.partition, cell) for cell in groups.cells)
        for position, record_id in zip(positions.tolist(), record_ids):
            if _membership_value(self.key, bytes(record_id)) < self.inclusion_probability:
                self.kept.add(int(position))
        self.experiences.append(int(experience))
        return True

    def save(self, state_dir: str | os.PathLike[str]) -> Path:
        """Write the buffer to ``state_dir/replay_buffer.safetensors`` atomically; returns the path."""
        arrays = {"positions": self.positions(), "experiences": np.array(self.experiences, dtype=np.int64)}
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "inclusion_probability": self.inclusion_probability,
            "key_check": _key_check(self.key),
            "held": None if self.held is None else sorted([list(pair) for pair in self.held]),
        }
        path = Path(state_dir) / BUFFER_FILE
        save_arrays(path, arrays, {"fedcl": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str], inclusion_probability: float) -> ReplayBuffer:
        """The buffer saved in ``state_dir``, or an empty one if there is none; the site's key is created on first use.

        Raises ``ValueError`` when the saved buffer is not a version-2 fedcl
        buffer, was built with another inclusion probability, or under
        another key than ``state_dir/replay.key``; or when the key file is not
        :data:`KEY_BYTES` bytes long.
        """
        check_inclusion_probability(inclusion_probability)
        key = load_or_create_key(state_dir)
        path = Path(state_dir) / BUFFER_FILE
        if not path.exists():
            return cls(float(inclusion_probability), key)
        arrays, meta = _read(path)
        if meta.get("format") != _FORMAT or meta.get("version") not in _READABLE:
            raise ValueError(
                f"{path} is not a fedcl replay buffer of version {', '.join(map(str, _READABLE))} (Bernoulli "
                "membership); delete it to start the buffer afresh"
            )
        if meta["inclusion_probability"] != inclusion_probability:
            raise ValueError(
                f"{path} holds a buffer built with inclusion probability {meta['inclusion_probability']!r}; this run "
                f"asks for {inclusion_probability!r}: restore the replay settings it was built with, or delete the "
                "file to start the buffer afresh"
            )
        if meta["key_check"] != _key_check(key):
            raise ValueError(
                f"{path} was built under another replay key than {Path(state_dir) / KEY_FILE}: restore that key "
                f"file, or delete {BUFFER_FILE} to start the buffer afresh"
            )
        return cls(
            float(inclusion_probability),
            key,
            {int(p) for p in arrays["positions"]},
            [int(e) for e in arrays["experiences"]],
            _held_of(meta),
        )


def held_groups(state_dir: str | os.PathLike[str]) -> frozenset[tuple[str, str]] | None:
    """The record groups the buffer saved in ``state_dir`` may hold: empty without a buffer, None when unknown.

    Reads the file's metadata only (no key needed).
    """
    path = Path(state_dir) / BUFFER_FILE
    if not path.exists():
        return frozenset()
    held = _held_of(_read(path)[1])  # damaged metadata reads as {}: unknown groups
    return None if held is None else frozenset(held)


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A buffer file's arrays and its ``fedcl`` metadata ({} when that is not JSON)."""
    arrays, raw = load_arrays(path)
    try:
        return arrays, json.loads(raw.get("fedcl", "{}"))
    except json.JSONDecodeError:
        return arrays, {}


def _held_of(meta: dict) -> set[tuple[str, str]] | None:
    """The ``held`` groups of a buffer's metadata (None for a version-2 buffer or unknown groups)."""
    held = meta.get("held") if meta.get("version") == _VERSION else None
    return None if held is None else {(str(p), str(c)) for p, c in held}


def load_or_create_key(state_dir: str | os.PathLike[str]) -> bytes:
    """The site's replay key from ``state_dir/replay.key``; on first use, 32 bytes of ``secrets.token_bytes``.

    A new key is written atomically with permissions 0600 (readable by the
    site's own user only). Raises ``ValueError`` if the file exists but is
    not :data:`KEY_BYTES` bytes long.
    """
    path = Path(state_dir) / KEY_FILE
    if not path.exists():
        write_atomic(path, secrets.token_bytes(KEY_BYTES))
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)  # mkstemp already made it 0600; say so explicitly
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(
            f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte replay key: restore the site's key "
            f"file, or delete it together with {BUFFER_FILE} to start replay afresh"
        )
    return key


def record_ids(input_ids: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | Sequence[int]) -> list[bytes]:
    """Content ids of records, one per row: the row's token ids (int64 little-endian) followed by its label.

    ``input_ids`` is ``(rows, length)``; ``labels`` holds one integer per row.
    The id depends on the row's content only, never on its position, so the
    same record gets the same id whatever else the dataset holds. Pass rows
    as encoded for training (same padding for every call). Raises
    ``ValueError`` when the shapes do not match.
    """
    tokens = input_ids.detach().cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    targets = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if tokens.ndim != 2:
        raise ValueError(f"input_ids has shape {tokens.shape}; pass a (rows, length) matrix of token ids")
    targets = targets.reshape(-1)
    if len(targets) != len(tokens):
        raise ValueError(f"{len(tokens)} rows of token ids but {len(targets)} labels; give one label per row")
    tokens = tokens.astype("<i8")
    return [row.tobytes() + int(label).to_bytes(8, "little", signed=True) for row, label in zip(tokens, targets)]


def check_inclusion_probability(probability: float) -> None:
    """Raise ``ValueError`` unless ``probability`` is a real number in (0, 1]."""
    if (
        isinstance(probability, bool)
        or not isinstance(probability, (int, float, np.floating, np.integer))
        or not math.isfinite(probability)
        or not 0 < probability <= 1
    ):
        raise ValueError(
            f"replay inclusion probability {probability!r}: use a number in (0, 1] computed from public "
            "values (e.g. min(1, replay-size / public record count))"
        )


def check_replay_settings(size: int, policy: str, data_size: int, site: str = "this site") -> None:
    """Reject replay settings that cannot work for a site with ``data_size`` training records.

    Raises :class:`ConfigError` (a ``ValueError``) for an unknown policy, a
    size that is not a whole number >= 1, or a size (expected records kept)
    larger than the site's training data. A local refusal only: nothing of
    ``data_size`` is sent.
    """
    if policy not in REPLAY_POLICIES:
        raise ConfigError(f"config key 'replay-policy' = {policy!r}: use one of {', '.join(REPLAY_POLICIES)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"config key 'replay-size' = {size!r}: use a whole number >= 1 (or 0 to turn replay off)")
    if size > data_size:
        raise ConfigError(
            f"config key 'replay-size' = {size}: {site} has only {data_size} training records; "
            f"use replay-size <= {data_size} (or 0 for no replay)"
        )


def training_pool(current: np.ndarray, buffer: ReplayBuffer | None) -> np.ndarray:
    """The positions DP-SGD samples from this round: the current experience plus the buffer, each once, sorted.

    A record in both (possible in domain-incremental streams only if an
    experience is offered twice) appears once: a record listed twice could be
    drawn twice into one Poisson batch and double its influence beyond the
    clipping bound the accountant assumes.
    """
    current = np.asarray(current, dtype=np.int64)
    return np.union1d(current, buffer.positions()) if buffer is not None else np.unique(current)


def _membership_value(key: bytes, record_id: bytes) -> float:
    """HMAC-SHA256(key, record_id) as a uniform number in [0, 1): the top 53 bits of the first 8 bytes.

    Why a keyed PRF and not a seeded RNG by position: a draw by position ties
    a record's fate to where it sits, so inserting one record shifts the draws
    of all records after it. HMAC of the record's content gives each record
    its own draw, independent of every other record (a PRF's outputs on
    distinct inputs are indistinguishable from independent uniforms), and
    without the key nobody (the server, another site) can predict or test
    which records a site keeps. 53 bits: exactly representable as a float.
    """
    digest = hmac.new(key, record_id, hashlib.sha256).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53


def _key_check(key: bytes) -> str:
    """A public check value of the key (HMAC of a fixed label): tells keys apart, reveals nothing about the key."""
    return hmac.new(key, _KEY_CHECK_LABEL, hashlib.sha256).hexdigest()[:16]


def _check_offer(positions: np.ndarray, ids: Sequence[bytes], experience: int) -> None:
    if isinstance(experience, bool) or not isinstance(experience, (int, np.integer)) or experience < 0:
        raise ValueError(f"experience {experience!r}: use the experience's index, a whole number >= 0")
    if len(positions) and not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"positions have dtype {positions.dtype}; pass integer rows of the site's train split")
    if len(positions) != len(ids):
        raise ValueError(
            f"{len(positions)} positions but {len(ids)} record ids; give one id per position "
            "(record_ids(input_ids[positions], labels[positions]))"
        )
    if len(positions) and positions.min() < 0:
        raise ValueError(f"position {positions.min()} is negative; pass rows of the site's train split")
    if len(np.unique(positions)) != len(positions):
        raise ValueError("positions repeat; offer each training record once")
    if not all(isinstance(i, (bytes, bytearray, memoryview)) for i in ids):
        raise ValueError("record ids must be bytes; build them with record_ids(input_ids, labels)")
