"""Secure aggregation (SecAgg): the server learns the sum of the sites' integer vectors mod 2**bits, nothing else.

The protocol core of Bonawitz et al. (CCS 2017), i.e. SecAgg+ (Bell et al., CCS 2020) on the complete graph (every
site is every other site's neighbour), as plain serialisable objects without Flower message plumbing. One round:

1. advertise keys: each site makes fresh :class:`SiteSecrets` (an EC key pair to encrypt shares, an EC key pair for
   the pairwise masks, a 32-byte self-mask seed) and sends its two public keys (:class:`PublicKeys`);
2. share keys: given every site's public keys and the threshold t (:class:`ShareKeysRequest`), a site splits its
   mask private key and its seed into n Shamir shares (any t reconstruct) and encrypts each other site's pair of
   shares to it (ECDH + HKDF + Fernet, the site ids inside the plaintext): :class:`EncryptedShares`;
3. masked input: a site receives the ciphertexts addressed to it and the list of sites that completed step 2
   (:class:`MaskRequest`) and sends y = x + PRG(seed) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij) mod 2**bits;
4. unmask: given the survivors (masked vector received) and the dropped (:class:`UnmaskRequest`), each survivor
   returns its share of every survivor's seed and of every dropped site's mask private key (:class:`UnmaskReply`);
   the server (:class:`SecureSumServer`) rebuilds those secrets, removes every mask and gets the survivors' sum.

Trust model. An honest-but-curious server (and any fewer than t sites colluding with it) learns from what it holds
(public keys, ciphertexts, masked vectors, share replies) the survivors' sum mod 2**bits and nothing else about a
site's vector. t is the Shamir threshold: t shares rebuild a secret, t - 1 reveal nothing; so t sites must survive,
and sites require 2t > n, so that no two disjoint groups can each reveal one kind of share of the same site. A site
refuses to unmask (ValueError) when a site is both survivor and dropped, a name is not a step-2 site, fewer than t
or than its own ``min_survivors`` survive (its policy, the hook for differential privacy: it never helps reveal a
sum of too few sites), or it revealed the other kind of share of a site before in the round (a seed share and a
mask-key share of one site unmask it alone). Keys are not signed here: a server that substitutes them is out of scope.

All arithmetic is in numpy uint64 (wrap-around mod 2**64, reduced mod 2**bits with a bit mask); vectors in and out
(x, masked vectors, the sum) are int64 arrays with values in [0, 2**bits). Every message and state object has
``to_dict()``/``from_dict()`` whose values (int, str, bytes, lists of those) can ride in a Flower ConfigRecord;
:class:`SiteState` also has ``to_bytes()``/``from_bytes()`` to live on disk between stages.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

SEED_BYTES = 32  # the self-mask seed, a ChaCha20 key
MAX_BITS = 62  # values and sums stay in [0, 2**62): representable as int64 with room to spare
MAX_SITE_ID = 2**64 - 1  # Flower node ids are uint64; the share plaintext holds 8-byte ids
SELF_MASK_TAG = b"fedcl-self-m"  # ChaCha20 nonce (12 bytes) of the self masks PRG(seed)
PAIR_MASK_TAG = b"fedcl-pair-m"  # ChaCha20 nonce (12 bytes) of the pairwise masks PRG(s_ij)

# Site stages: what the next call may be.
KEYS_ADVERTISED = "keys-advertised"  # next: share_keys
KEYS_SHARED = "keys-shared"  # next: mask_input
INPUT_MASKED = "input-masked"  # next: reveal_shares (possibly more than once)
SITE_STAGES = (KEYS_ADVERTISED, KEYS_SHARED, INPUT_MASKED)

# Server stages.
COLLECTING_KEYS = "collecting-keys"
COLLECTING_SHARES = "collecting-shares"
COLLECTING_MASKED = "collecting-masked"
UNMASKING = "unmasking"
SERVER_STAGES = (COLLECTING_KEYS, COLLECTING_SHARES, COLLECTING_MASKED, UNMASKING)

ConfigValue = int | str | bytes | list[int] | list[bytes]


# --- the PRG ------------------------------------------------------------------------------------------------------
def prg_mask(key: bytes, tag: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudo-random values uniform in [0, 2**bits) from ``key``: a uint64 array.

    The ChaCha20 (RFC 8439) keystream of the 32-byte ``key`` with block counter 0 and the 12-byte ``tag`` as nonce
    (:data:`SELF_MASK_TAG` or :data:`PAIR_MASK_TAG`: the two kinds of mask never share a keystream), read as
    little-endian uint64 with the low ``bits`` bits kept (uniform, as 2**bits divides 2**64). Flower's
    ``pseudo_rand_gen`` is not used: it seeds numpy's MT19937 with a 32-bit XOR fold of the seed, so whoever sees a
    masked vector could find the mask by trying 2**32 seeds.
    """
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("a mask key must be 32 bytes (a self-mask seed or a pairwise key from generate_shared_key)")
    if not isinstance(tag, bytes) or len(tag) != 12:
        raise ValueError("a mask tag must be 12 bytes: use SELF_MASK_TAG or PAIR_MASK_TAG")
    _check_bits(bits)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"mask length {length!r}: give the vector length, an int >= 0")
    keystream = Cipher(algorithms.ChaCha20(key, bytes(4) + tag), mode=None).encryptor().update(bytes(8 * length))
    values = np.frombuffer(keystream, dtype="<u8").astype(np.uint64)
    values &= _modulus_mask(bits)
    return values


def _check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is an int in [1, MAX_BITS] (the sum is taken mod 2**bits)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits = {bits!r}: use an int from 1 to {MAX_BITS} (the sum is taken mod 2**bits)")


def _modulus_mask(bits: int) -> np.uint64:
    """2**bits - 1 as a uint64: ``value & _modulus_mask(bits)`` is ``value mod 2**bits``."""
    _check_bits(bits)
    return np.uint64((1 << bits) - 1)


def _pairwise_mask_key(mask_private_key: ec.EllipticCurvePrivateKey, peer_mask_public_key: bytes) -> bytes:
    """The 32-byte pairwise key s_ij agreed from i's mask private key and j's mask public key (s_ij = s_ji)."""
    peer = _load_public_key(peer_mask_public_key, "mask public key")
    return base64.urlsafe_b64decode(generate_shared_key(mask_private_key, peer))


def _load_public_key(data: bytes, what: str) -> ec.EllipticCurvePublicKey:
    """A PEM public key on the curve of ``generate_key_pairs`` (SECP384R1); ValueError for anything else."""
    try:
        key = bytes_to_public_key(data)
    except Exception as error:  # cryptography raises ValueError, TypeError or UnsupportedAlgorithm
        raise ValueError(f"a {what} is not a PEM EC public key ({error}): the site must advertise fresh keys") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ValueError(f"a {what} is not on SECP384R1: the site must advertise keys from generate_key_pairs")
    return key


def _check_vector(values: Any, bits: int, what: str) -> np.ndarray:
    """``values`` as a 1-D uint64 array after checking it is integer-typed with values in [0, 2**bits)."""
    array = np.asarray(values)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D integer array (int64), not {array.dtype} of shape {array.shape}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= 1 << bits):
        raise ValueError(f"{what} has values outside [0, 2**{bits}): reduce them mod 2**bits (or raise bits) first")
    return array.astype(np.uint64)


# --- serialisation helpers ----------------------------------------------------------------------------------------
def _check_site_id(site_id: Any) -> int:
    """``site_id`` after checking it is an int in [0, 2**64) (a Flower node id)."""
    if isinstance(site_id, bool) or not isinstance(site_id, int) or not 0 <= site_id <= MAX_SITE_ID:
        raise ValueError(f"site id {site_id!r}: site ids are ints in [0, 2**64) (Flower node ids)")
    return site_id


def _check_site_ids(site_ids: Iterable[Any], what: str) -> list[int]:
    """The ids as a list after checking each (see :func:`_check_site_id`) and that none repeats."""
    ids = [_check_site_id(site_id) for site_id in site_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} names a site more than once: list each site once")
    return ids


def _read_value(record: Mapping[str, Any], key: str, kind: str, what: str) -> Any:
    """``record[key]`` after checking its type: kind is 'int', 'str', 'bytes', 'ints' or 'bytes-list'."""
    if key not in record:
        raise ValueError(f"{what} lacks '{key}': build it with {what}.to_dict()")
    value = record[key]

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    ok = {
        "int": lambda: is_int(value),
        "str": lambda: isinstance(value, str),
        "bytes": lambda: isinstance(value, bytes),
        "ints": lambda: isinstance(value, list) and all(is_int(v) for v in value),
        "bytes-list": lambda: isinstance(value, list) and all(isinstance(v, bytes) for v in value),
    }[kind]()
    if not ok:
        raise ValueError(f"{what}['{key}'] should be of kind {kind}, not {type(value).__name__}: use {what}.to_dict()")
    return list(value) if isinstance(value, list) else value


def _read_mapping(record: Mapping[str, Any], ids_key: str, values_key: str, what: str) -> dict[int, bytes]:
    """The dict site id -> bytes stored as two parallel lists ``record[ids_key]``, ``record[values_key]``."""
    ids = _check_site_ids(_read_value(record, ids_key, "ints", what), f"{what}['{ids_key}']")
    values = _read_value(record, values_key, "bytes-list", what)
    if len(ids) != len(values):
        raise ValueError(f"{what}: '{ids_key}' and '{values_key}' differ in length: use {what}.to_dict()")
    return dict(zip(ids, values))


def _mapping_lists(mapping: Mapping[int, bytes]) -> tuple[list[int], list[bytes]]:
    """A dict site id -> bytes as two parallel lists, ids ascending."""
    ids = sorted(mapping)
    return ids, [mapping[site_id] for site_id in ids]


def _config_to_bytes(record: Mapping[str, ConfigValue]) -> bytes:
    """A ConfigRecord-style dict (int, str, bytes, lists of those) as JSON bytes, bytes values in base64."""

    def encode(value: Any) -> Any:
        if isinstance(value, bytes):
            return {"b64": base64.b64encode(value).decode("ascii")}
        if isinstance(value, list):
            return [encode(v) for v in value]
        return value

    return json.dumps({key: encode(value) for key, value in record.items()}, sort_keys=True).encode("utf-8")


def _config_from_bytes(payload: bytes) -> dict[str, ConfigValue]:
    """The inverse of :func:`_config_to_bytes`."""

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            return base64.b64decode(value["b64"], validate=True)
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    try:
        raw = json.loads(payload.decode("utf-8"))
        return {key: decode(value) for key, value in raw.items()}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as error:
        raise ValueError(f"not a saved secure-aggregation state ({error}): write it with to_bytes()") from None


# --- messages -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublicKeys:
    """Step 1, site -> server: a site's two PEM public keys (to encrypt shares to it; to agree pairwise masks)."""

    enc_public_key: bytes
    mask_public_key: bytes

    def to_dict(self) -> dict[str, ConfigValue]:
        """ConfigRecord values."""
        return {"enc-public-key": self.enc_public_key, "mask-public-key": self.mask_public_key}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> PublicKeys:
        """The inverse of :meth:`to_dict` (ValueError for a malformed record)."""
        return cls(
            _read_value(record, "enc-public-key", "bytes", "PublicKeys"),
            _read_value(record, "mask-public-key", "bytes", "PublicKeys"),
        )


@dataclass
class ShareKeysRequest:
    """Step 2, server -> every site: the threshold t and the public keys of every site that advertised them."""

    threshold: int
    public_keys: dict[int, PublicKeys]

    def to_dict(self) -> dict[str, ConfigValue]:
        """ConfigRecord values (the keys as parallel lists, site ids ascending)."""
        ids = sorted(self.public_keys)
        return {
            "threshold": self.threshold,
            "site-ids": ids,
            "enc-public-keys": [self.public_keys[i].enc_public_key for i in ids],
            "mask-public-keys": [self.public_keys[i].mask_public_key for i in ids],
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ShareKeysRequest:
        """The inverse of :meth:`to_dict` (ValueError for a malformed record)."""
        enc = _read_mapping(record, "site-ids", "enc-public-keys", "ShareKeysRequest")
        mask = _read_mapping(record, "site-ids", "mask-public-keys", "ShareKeysRequest")
        keys = {site_id: PublicKeys(enc[site_id], mask[site_id]) for site_id in enc}
        return cls(_read_value(record, "threshold", "int", "ShareKeysRequest"), keys)


@dataclass
class EncryptedShares:
    """Step 2, site -> server: per destination site, the ciphertext of the sender's shares for it."""

    ciphertexts: dict[int, bytes]

    def to_dict(self) -> dict[str, ConfigValue]:
        """ConfigRecord values."""
        ids, ciphertexts = _mapping_lists(self.ciphertexts)
        return {"site-ids": ids, "ciphertexts": ciphertexts}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EncryptedShares:
        """The inverse of :meth:`to_dict` (ValueError for a malformed record)."""
        return cls(_read_mapping(record, "site-ids", "ciphertexts", "EncryptedShares"))


@dataclass
class MaskRequest:
    """Step 3, server -> one site: the sites that completed step 2, the ciphertexts they sent it (by sender), bits."""

    round_sites: list[int]
    ciphertexts: dict[int, bytes]
    bits: int

    def to_dict(self) -> dict[str, ConfigValue]:
        """ConfigRecord values."""
        ids, ciphertexts = _mapping_lists(self.ciphertexts)
        return {
            "round-sites": list(self.round_sites),
            "sender-ids": ids,
            "ciphertexts": ciphertexts,
            "bits": self.bits,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> MaskRequest:
        """The inverse of :meth:`to_dict` (ValueError for a malformed record)."""
        return cls(
            _read_value(record, "round-sites", "ints", "MaskRequest"),
            _read_mapping(record, "sender-ids", "ciphertexts", "MaskRequest"),
            _read_value(record, "bits", "int", "MaskRequest"),
        )


@dataclass
class UnmaskRequest:
    """Step 4, server -> every survivor: the survivors (masked vector received) and the dropped step-2 sites."""

    survivors: list[int]
    dropped: list[int]

    def to_dict(self) -> dict[str, ConfigValue]:
        """ConfigRecord values."""
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> UnmaskRequest:
        """The inverse of :meth:`to_dict` (ValueError for a malformed record)."""
        return cls(
            _read_value(record, "survivors", "ints", "UnmaskRequest"),
            _read_value(record, "dropped", "ints", "UnmaskRequest"),
        )


@dataclass
class UnmaskReply:
    """Step 4, survivor -> server: its share of each survivor's seed and of each dropped site's mask private key."""

    seed_shares: dict[int, bytes]
    mask_key_shares: dict[int, bytes]

    def to_dict(self) -> dict[str, ConfigValue]:
        """ConfigRecord values."""
        seed_ids, seed_shares = _mapping_lists(self.seed_shares)
        key_ids, key_shares = _mapping_lists(self.mask_key_shares)
        return {
            "seed-share-ids": seed_ids,
            "seed-shares": seed_shares,
            "mask-key-share-ids": key_ids,
            "mask-key-shares": key_shares,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> UnmaskReply:
        """The inverse of :meth:`to_dict` (ValueError for a malformed record)."""
        return cls(
            _read_mapping(record, "seed-share-ids", "seed-shares", "UnmaskReply"),
            _read_mapping(record, "mask-key-share-ids", "mask-key-shares", "UnmaskReply"),
        )


# --- the site -----------------------------------------------------------------------------------------------------
@dataclass
class SiteSecrets:
    """A site's secrets for one round: two PEM private keys (share encryption, mask agreement) and the mask seed."""

    enc_private_key: bytes = field(repr=False)
    mask_private_key: bytes = field(repr=False)
    seed: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> SiteSecrets:
        """Fresh secrets: two SECP384R1 key pairs and a 32-byte seed from ``os.urandom``. Never reuse across rounds."""
        enc_private_key, _ = generate_key_pairs()
        mask_private_key, _ = generate_key_pairs()
        return cls(
            private_key_to_bytes(enc_private_key), private_key_to_bytes(mask_private_key), os.urandom(SEED_BYTES)
        )

    def public_keys(self) -> PublicKeys:
        """The two public keys to advertise (step 1)."""
        return PublicKeys(
            public_key_to_bytes(bytes_to_private_key(self.enc_private_key).public_key()),
            public_key_to_bytes(bytes_to_private_key(self.mask_private_key).public_key()),
        )

    def to_dict(self) -> dict[str, ConfigValue]:
        """ConfigRecord values: secret, keep them on the site (a file only the site's user can read)."""
        return {"enc-private-key": self.enc_private_key, "mask-private-key": self.mask_private_key, "seed": self.seed}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> SiteSecrets:
        """The inverse of :meth:`to_dict` (ValueError for a malformed record)."""
        seed = _read_value(record, "seed", "bytes", "SiteSecrets")
        if len(seed) != SEED_BYTES:
            raise ValueError(
                f"SiteSecrets['seed'] must be {SEED_BYTES} bytes: make secrets with SiteSecrets.generate()"
            )
        return cls(
            _read_value(record, "enc-private-key", "bytes", "SiteSecrets"),
            _read_value(record, "mask-private-key", "bytes", "SiteSecrets"),
            seed,
        )


@dataclass
class SiteState:
    """One site's side of one round: its secrets, what it received, and which shares it has revealed.

    Make it with :meth:`start`, then call :meth:`share_keys`, :meth:`mask_input` and :meth:`reveal_shares` in this
    order. Each method checks the request first and changes the state only when it answers; a refused request
    (ValueError) leaves the state as it was. Between stages the state may live on disk (:meth:`to_bytes`): save it
    after each stage *before* sending the reply, or the record of revealed shares could be lost. It holds private
    keys: keep it readable by the site only, and start a new state every round.
    """

    site_id: int
    secrets: SiteSecrets
    stage: str = KEYS_ADVERTISED
    threshold: int = 0
    public_keys: dict[int, PublicKeys] = field(default_factory=dict)  # step 2: every site that advertised keys
    own_seed_share: bytes = field(default=b"", repr=False)
    own_mask_key_share: bytes = field(default=b"", repr=False)
    round_sites: list[int] = field(default_factory=list)  # step 3: the sites that completed step 2 (with this one)
    ciphertexts: dict[int, bytes] = field(default_factory=dict)  # step 3: sender -> its shares for this site
    seed_shares_revealed: list[int] = field(default_factory=list)  # step 4: sites whose seed share was sent
    mask_key_shares_revealed: list[int] = field(default_factory=list)  # step 4: sites whose mask-key share was sent

    @classmethod
    def start(cls, site_id: int) -> SiteState:
        """Step 1: a new round's state with fresh secrets; advertise :meth:`advertised_keys`."""
        return cls(_check_site_id(site_id), SiteSecrets.generate())

    def advertised_keys(self) -> PublicKeys:
        """The public keys this site advertises in step 1."""
        return self.secrets.public_keys()

    def _require_stage(self, stage: str, action: str) -> None:
        """Raise ValueError unless the state is at ``stage`` (the protocol's order, one answer per stage)."""
        if self.stage != stage:
            raise ValueError(
                f"site {self.site_id} cannot {action} at stage '{self.stage}' (needs '{stage}'): the steps run in "
                "order, once each; start a new round with SiteState.start()"
            )

    def share_keys(self, request: ShareKeysRequest) -> EncryptedShares:
        """Step 2: Shamir-share the mask private key and the seed (any t of n shares rebuild), encrypt them per site.

        Returns destination -> ciphertext of (this id, its id, seed share, mask-key share); keeps its own shares.

        Refuses (ValueError) a request that does not list this site's own public keys unchanged, that repeats a public
        key, whose keys are not SECP384R1, or whose threshold is not an int with n / 2 < t <= n (n sites listed).
        """
        self._require_stage(KEYS_ADVERTISED, "share keys")
        keys = request.public_keys
        ids = sorted(_check_site_ids(keys, "the list of public keys"))
        n, threshold = len(ids), request.threshold
        if keys.get(self.site_id) != self.advertised_keys():
            raise ValueError(
                f"the key list does not hold site {self.site_id}'s own public keys unchanged: the server must relay "
                "every site's advertised keys as sent"
            )
        every_key = [k.enc_public_key for k in keys.values()] + [k.mask_public_key for k in keys.values()]
        if len(set(every_key)) != len(every_key):
            raise ValueError("two advertised public keys are equal: every site must advertise fresh keys of its own")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not n < 2 * threshold <= 2 * n:
            raise ValueError(
                f"threshold {threshold!r} for {n} sites: use an int t with n / 2 < t <= n (here {n // 2 + 1} to {n}), "
                "so that t sites must survive and no two disjoint groups of sites can each reveal one kind of share"
            )
        enc_public_keys = {j: _load_public_key(keys[j].enc_public_key, "encryption public key") for j in ids}
        for j in ids:
            _load_public_key(keys[j].mask_public_key, "mask public key")
        seed_shares = create_shares(self.secrets.seed, threshold, n)
        key_shares = create_shares(self.secrets.mask_private_key, threshold, n)
        enc_private_key = bytes_to_private_key(self.secrets.enc_private_key)
        ciphertexts: dict[int, bytes] = {}
        for position, j in enumerate(ids):
            if j == self.site_id:
                continue
            plaintext = share_keys_plaintext_concat(self.site_id, j, seed_shares[position], key_shares[position])
            ciphertexts[j] = encrypt(generate_shared_key(enc_private_key, enc_public_keys[j]), plaintext)
        own = ids.index(self.site_id)
        self.threshold, self.public_keys = threshold, dict(keys)
        self.own_seed_share, self.own_mask_key_share = seed_shares[own], key_shares[own]
        self.stage = KEYS_SHARED
        return EncryptedShares(ciphertexts)

    def _open_shares(self, sender: int, ciphertext: bytes) -> tuple[bytes, bytes]:
        """Decrypt ``sender``'s ciphertext for this site: (its seed share, its mask-key share).

        ValueError when it does not decrypt (tampered with, or encrypted for another site) or when the ids inside
        are not ``sender`` and this site.
        """
        if not isinstance(ciphertext, bytes):
            raise ValueError(f"the ciphertext from site {sender} is not bytes: relay the ciphertexts as sent")
        sender_keys = self.public_keys[sender]
        enc_private_key = bytes_to_private_key(self.secrets.enc_private_key)
        key = generate_shared_key(enc_private_key, _load_public_key(sender_keys.enc_public_key, "encryption key"))
        try:
            plaintext = decrypt(key, ciphertext)
        except InvalidToken:
            raise ValueError(
                f"site {self.site_id} cannot decrypt the shares from site {sender} (tampered with, or not encrypted "
                "for this site): abandon this round"
            ) from None
        source, destination, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if source != sender or destination != self.site_id:
            raise ValueError(
                f"shares relayed as site {sender} -> site {self.site_id} say they are from site {source} to site "
                f"{destination}: the server misrouted them; abandon this round"
            )
        return seed_share, key_share

    def mask_input(self, request: MaskRequest, x: np.ndarray) -> np.ndarray:
        """Step 3: check and keep the ciphertexts addressed to this site, return the masked vector (int64 in [0, M)).

        y = x + PRG(seed) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij) mod M = 2**bits over the sites j of
        ``request.round_sites`` (the step-2 sites). ``x`` is a 1-D integer array with values in [0, M). Refuses
        (ValueError) when the round sites are not among the advertised ones, miss this site, are fewer than t, or
        differ from the senders of the ciphertexts, and when a ciphertext does not decrypt or names other sites inside.
        """
        self._require_stage(KEYS_SHARED, "mask its input")
        _check_bits(request.bits)
        round_sites = sorted(_check_site_ids(request.round_sites, "MaskRequest.round_sites"))
        if not set(round_sites) <= set(self.public_keys):
            raise ValueError(
                "the round sites name sites that did not advertise keys: the server must list step-2 sites"
            )
        if self.site_id not in round_sites:
            raise ValueError(f"the round sites omit site {self.site_id} itself, which completed step 2")
        if len(round_sites) < self.threshold:
            raise ValueError(
                f"{len(round_sites)} sites completed step 2, fewer than the threshold {self.threshold}: "
                "abandon this round"
            )
        senders = set(_check_site_ids(request.ciphertexts, "MaskRequest.ciphertexts"))
        if senders != set(round_sites) - {self.site_id}:
            raise ValueError(
                "the ciphertexts relayed to this site do not come from exactly the other round sites: the server "
                "must relay each step-2 site's shares for this site"
            )
        for sender in sorted(senders):
            self._open_shares(sender, request.ciphertexts[sender])
        values = _check_vector(x, request.bits, "the input vector x")
        masked = values + prg_mask(self.secrets.seed, SELF_MASK_TAG, values.size, request.bits)
        mask_private_key = bytes_to_private_key(self.secrets.mask_private_key)
        for j in round_sites:
            if j == self.site_id:
                continue
            key = _pairwise_mask_key(mask_private_key, self.public_keys[j].mask_public_key)
            pairwise = prg_mask(key, PAIR_MASK_TAG, values.size, request.bits)
            if j > self.site_id:
                np.add(masked, pairwise, out=masked)
            else:
                np.subtract(masked, pairwise, out=masked)
        masked &= _modulus_mask(request.bits)
        self.round_sites, self.ciphertexts = round_sites, dict(request.ciphertexts)
        self.stage = INPUT_MASKED
        return masked.astype(np.int64)

    def reveal_shares(self, request: UnmaskRequest, *, min_survivors: int) -> UnmaskReply:
        """Step 4: this site's share of each survivor's seed and of each dropped site's mask private key.

        ``min_survivors`` is the site's own policy: it never helps reveal a sum of fewer sites. Refuses (ValueError)
        when a site is both survivor and dropped; when the two lists are not exactly the step-2 sites or name this
        site as dropped; when there are fewer survivors than t or than ``min_survivors``; when it revealed the other
        kind of share of one of these sites before in this round; or when a held ciphertext does not open. May be
        asked again (a retry); the sites whose shares it sent are recorded in the state.
        """
        self._require_stage(INPUT_MASKED, "reveal shares")
        if isinstance(min_survivors, bool) or not isinstance(min_survivors, int) or min_survivors < 1:
            raise ValueError(f"min_survivors = {min_survivors!r}: give the site's policy, an int >= 1")
        survivors = set(_check_site_ids(request.survivors, "UnmaskRequest.survivors"))
        dropped = set(_check_site_ids(request.dropped, "UnmaskRequest.dropped"))
        if survivors & dropped:
            raise ValueError(
                f"sites {sorted(survivors & dropped)} are listed both as survivors and as dropped: revealing both "
                "kinds of share of one site would unmask it; the server must list each step-2 site once"
            )
        unknown = (survivors | dropped) - set(self.round_sites)
        if unknown:
            raise ValueError(
                f"sites {sorted(unknown)} did not complete step 2 in this round: the server must name step-2 sites only"
            )
        missing = set(self.round_sites) - survivors - dropped
        if missing:
            raise ValueError(
                f"step-2 sites {sorted(missing)} are neither survivors nor dropped: the server must list all"
            )
        if self.site_id in dropped:
            raise ValueError(
                f"site {self.site_id} is listed as dropped, yet it sent its masked vector: abandon this round"
            )
        if len(survivors) < self.threshold:
            raise ValueError(
                f"{len(survivors)} survivors, fewer than the threshold {self.threshold}: the sum cannot be unmasked; "
                "abandon this round"
            )
        if len(survivors) < min_survivors:
            raise ValueError(
                f"{len(survivors)} survivors, fewer than this site's min_survivors = {min_survivors}: it does not help "
                "reveal a sum of so few sites; abandon this round"
            )
        conflict = (survivors & set(self.mask_key_shares_revealed)) | (dropped & set(self.seed_shares_revealed))
        if conflict:
            raise ValueError(
                f"site {self.site_id} already revealed the other kind of share of sites {sorted(conflict)} this round: "
                "revealing both would unmask them; abandon this round"
            )
        held: dict[int, tuple[bytes, bytes]] = {self.site_id: (self.own_seed_share, self.own_mask_key_share)}
        for j in sorted((survivors | dropped) - {self.site_id}):
            held[j] = self._open_shares(j, self.ciphertexts[j])
        reply = UnmaskReply(
            {j: held[j][0] for j in sorted(survivors)},
            {j: held[j][1] for j in sorted(dropped)},
        )
        self.seed_shares_revealed = sorted(set(self.seed_shares_revealed) | survivors)
        self.mask_key_shares_revealed = sorted(set(self.mask_key_shares_revealed) | dropped)
        return reply

    def to_dict(self) -> dict[str, ConfigValue]:
        """ConfigRecord values, private keys included (see the class docstring)."""
        ids = sorted(self.public_keys)
        ciphertext_ids, ciphertexts = _mapping_lists(self.ciphertexts)
        return {
            "site-id": self.site_id,
            "stage": self.stage,
            "threshold": self.threshold,
            **self.secrets.to_dict(),
            "key-site-ids": ids,
            "enc-public-keys": [self.public_keys[i].enc_public_key for i in ids],
            "mask-public-keys": [self.public_keys[i].mask_public_key for i in ids],
            "own-seed-share": self.own_seed_share,
            "own-mask-key-share": self.own_mask_key_share,
            "round-sites": list(self.round_sites),
            "ciphertext-site-ids": ciphertext_ids,
            "ciphertexts": ciphertexts,
            "seed-shares-revealed": list(self.seed_shares_revealed),
            "mask-key-shares-revealed": list(self.mask_key_shares_revealed),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> SiteState:
        """The inverse of :meth:`to_dict` (ValueError for a malformed record)."""
        what = "SiteState"
        stage = _read_value(record, "stage", "str", what)
        if stage not in SITE_STAGES:
            raise ValueError(f"SiteState['stage'] = {stage!r} is none of {SITE_STAGES}: use SiteState.to_dict()")
        enc = _read_mapping(record, "key-site-ids", "enc-public-keys", what)
        mask = _read_mapping(record, "key-site-ids", "mask-public-keys", what)
        return cls(
            site_id=_check_site_id(_read_value(record, "site-id", "int", what)),
            secrets=SiteSecrets.from_dict(record),
            stage=stage,
            threshold=_read_value(record, "threshold", "int", what),
            public_keys={site_id: PublicKeys(enc[site_id], mask[site_id]) for site_id in enc},
            own_seed_share=_read_value(record, "own-seed-share", "bytes", what),
            own_mask_key_share=_read_value(record, "own-mask-key-share", "bytes", what),
            round_sites=_check_site_ids(_read_value(record, "round-sites", "ints", what), "SiteState['round-sites']"),
            ciphertexts=_read_mapping(record, "ciphertext-site-ids", "ciphertexts", what),
            seed_shares_revealed=_read_value(record, "seed-shares-revealed", "ints", what),
            mask_key_shares_revealed=_read_value(record, "mask-key-shares-revealed", "ints", what),
        )

    def to_bytes(self) -> bytes:
        """The state as bytes (JSON) for a file between stages; private keys included."""
        return _config_to_bytes(self.to_dict())

    @classmethod
    def from_bytes(cls, payload: bytes) -> SiteState:
        """The inverse of :meth:`to_bytes` (ValueError for anything else)."""
        return cls.from_dict(_config_from_bytes(payload))


# --- the server ---------------------------------------------------------------------------------------------------
class SecureSumServer:
    """The server's side of one round: relays keys and shares, collects masked vectors, unmasks the sum.

    Call :meth:`add_public_keys` per site, then :meth:`share_keys_request` (broadcast it), :meth:`add_encrypted_shares`
    per site, :meth:`mask_request` per step-2 site, :meth:`add_masked_vector` per site, :meth:`unmask_request`
    (send it to the survivors) and :meth:`unmask` with at least t replies. It never gets any site's x. Its state
    round-trips through :meth:`to_dict`/:meth:`from_dict` (for a server that resumes).
    """

    def __init__(self, threshold: int, bits: int) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"threshold {threshold!r}: use an int >= 1 (more than half the sites)")
        _check_bits(bits)
        self.threshold, self.bits = threshold, bits
        self.stage = COLLECTING_KEYS
        self.public_keys: dict[int, PublicKeys] = {}
        self.ciphertexts: dict[int, dict[int, bytes]] = {}  # sender -> destination -> ciphertext
        self.round_sites: list[int] = []
        self.masked: dict[int, np.ndarray] = {}  # site -> masked vector (uint64)
        self.survivors: list[int] = []
        self.dropped: list[int] = []

    def _require_stage(self, stages: Sequence[str], action: str) -> None:
        """Raise ValueError unless the round is at one of ``stages``."""
        if self.stage not in stages:
            raise ValueError(f"the server cannot {action} at stage '{self.stage}': the steps run in order")

    def add_public_keys(self, site_id: int, keys: PublicKeys) -> None:
        """Step 1: record a site's advertised keys (ValueError for a site already heard or a key already seen)."""
        self._require_stage([COLLECTING_KEYS], "take advertised keys")
        _check_site_id(site_id)
        if site_id in self.public_keys:
            raise ValueError(f"site {site_id} already advertised keys this round: keep its first keys")
        seen = {k.enc_public_key for k in self.public_keys.values()} | {
            k.mask_public_key for k in self.public_keys.values()
        }
        if keys.enc_public_key == keys.mask_public_key or {keys.enc_public_key, keys.mask_public_key} & seen:
            raise ValueError(f"site {site_id} advertised a public key already in use: drop it from this round")
        _load_public_key(keys.enc_public_key, "encryption public key")
        _load_public_key(keys.mask_public_key, "mask public key")
        self.public_keys[site_id] = keys

    def share_keys_request(self) -> ShareKeysRequest:
        """Step 2: close advertising; the request to broadcast (ValueError unless n / 2 < t <= n sites advertised)."""
        self._require_stage([COLLECTING_KEYS, COLLECTING_SHARES], "send the key list")
        n = len(self.public_keys)
        if not n < 2 * self.threshold <= 2 * n:
            raise ValueError(
                f"{n} sites advertised keys, threshold {self.threshold}: the protocol needs n / 2 < t <= n; wait for "
                "more sites or start the round again with another threshold"
            )
        self.stage = COLLECTING_SHARES
        return ShareKeysRequest(self.threshold, dict(self.public_keys))

    def add_encrypted_shares(self, site_id: int, shares: EncryptedShares) -> None:
        """Step 2: record a site's ciphertexts (ValueError unless it advertised and wrote to every other such site)."""
        self._require_stage([COLLECTING_SHARES], "take encrypted shares")
        if site_id not in self.public_keys:
            raise ValueError(f"site {site_id} did not advertise keys this round: ignore its shares")
        if site_id in self.ciphertexts:
            raise ValueError(f"site {site_id} already sent its shares this round: keep its first ones")
        if set(shares.ciphertexts) != set(self.public_keys) - {site_id}:
            raise ValueError(f"site {site_id} did not send one ciphertext per other advertised site: drop it")
        self.ciphertexts[site_id] = dict(shares.ciphertexts)

    def mask_request(self, site_id: int) -> MaskRequest:
        """Step 3: the request for one step-2 site. The first call closes step 2 (ValueError: fewer than t sites)."""
        self._require_stage([COLLECTING_SHARES, COLLECTING_MASKED], "ask for masked vectors")
        if self.stage == COLLECTING_SHARES:
            if len(self.ciphertexts) < self.threshold:
                raise ValueError(
                    f"{len(self.ciphertexts)} sites completed step 2, fewer than the threshold {self.threshold}: "
                    "abandon this round"
                )
            self.round_sites = sorted(self.ciphertexts)
            self.stage = COLLECTING_MASKED
        if site_id not in self.round_sites:
            raise ValueError(f"site {site_id} did not complete step 2: it takes no part in this round's sum")
        relayed = {src: self.ciphertexts[src][site_id] for src in self.round_sites if src != site_id}
        return MaskRequest(list(self.round_sites), relayed, self.bits)

    def add_masked_vector(self, site_id: int, masked: np.ndarray) -> None:
        """Step 3: record a step-2 site's masked vector (1-D int in [0, 2**bits), one length for all sites)."""
        self._require_stage([COLLECTING_MASKED], "take masked vectors")
        if site_id not in self.round_sites:
            raise ValueError(f"site {site_id} did not complete step 2: ignore its masked vector")
        if site_id in self.masked:
            raise ValueError(f"site {site_id} already sent its masked vector: keep the first")
        values = _check_vector(masked, self.bits, f"the masked vector of site {site_id}")
        lengths = {v.size for v in self.masked.values()}
        if lengths and values.size not in lengths:
            raise ValueError(f"the masked vector of site {site_id} has {values.size} values, the others {lengths}")
        self.masked[site_id] = values

    def unmask_request(self) -> UnmaskRequest:
        """Step 4: close step 3; survivors and dropped to send the survivors (ValueError: fewer than t survivors)."""
        self._require_stage([COLLECTING_MASKED, UNMASKING], "ask for shares")
        if self.stage == COLLECTING_MASKED:
            if len(self.masked) < self.threshold:
                raise ValueError(
                    f"{len(self.masked)} masked vectors, fewer than the threshold {self.threshold}: abandon this round"
                )
            self.survivors = sorted(self.masked)
            self.dropped = sorted(set(self.round_sites) - set(self.masked))
            self.stage = UNMASKING
        return UnmaskRequest(list(self.survivors), list(self.dropped))

    def unmask(self, replies: Mapping[int, UnmaskReply]) -> np.ndarray:
        """Step 4: the survivors' sum mod 2**bits (int64) from at least t survivors' replies (keyed by sender).

        Rebuilds each survivor's seed and each dropped site's mask private key from the replies of the t survivors
        with the smallest ids, and removes all masks. ValueError when fewer than t replies are given, a reply is not
        from a survivor or lacks a share, or a secret does not rebuild (a rebuilt mask key must match its public key).
        """
        self._require_stage([UNMASKING], "unmask")
        if len(replies) < self.threshold:
            raise ValueError(
                f"{len(replies)} share replies, fewer than the threshold {self.threshold}: wait for more survivors' "
                "replies, or abandon this round"
            )
        strangers = set(replies) - set(self.survivors)
        if strangers:
            raise ValueError(f"share replies from sites {sorted(strangers)}, which are not survivors: ignore them")
        for site_id, reply in replies.items():
            if set(reply.seed_shares) != set(self.survivors) or set(reply.mask_key_shares) != set(self.dropped):
                raise ValueError(
                    f"site {site_id}'s reply does not hold one share per survivor and dropped site: drop it"
                )
        # t shares determine each secret; more would only add work (Lagrange interpolation is quadratic in the count)
        used = [replies[site_id] for site_id in sorted(replies)[: self.threshold]]
        mask = _modulus_mask(self.bits)
        length = next(iter(self.masked.values())).size
        total = np.zeros(length, dtype=np.uint64)
        for site_id in self.survivors:
            np.add(total, self.masked[site_id], out=total)
        for site_id in self.survivors:
            seed = self._rebuild([reply.seed_shares[site_id] for reply in used], f"site {site_id}'s seed")
            if len(seed) != SEED_BYTES:
                raise ValueError(
                    f"site {site_id}'s seed rebuilt to {len(seed)} bytes, not {SEED_BYTES}: a share is bad"
                )
            np.subtract(total, prg_mask(seed, SELF_MASK_TAG, length, self.bits), out=total)
        for site_id in self.dropped:
            secret = self._rebuild([reply.mask_key_shares[site_id] for reply in used], "a mask key")
            try:
                private_key = bytes_to_private_key(secret)
            except Exception:  # cryptography raises ValueError, TypeError or UnsupportedAlgorithm
                raise ValueError(f"site {site_id}'s mask private key did not rebuild: a share is bad") from None
            if public_key_to_bytes(private_key.public_key()) != self.public_keys[site_id].mask_public_key:
                raise ValueError(f"site {site_id}'s mask key rebuilt does not match its advertised key: a share is bad")
            for survivor in self.survivors:
                key = _pairwise_mask_key(private_key, self.public_keys[survivor].mask_public_key)
                pairwise = prg_mask(key, PAIR_MASK_TAG, length, self.bits)
                # the survivor added +PRG(s) for a peer with a larger id and -PRG(s) for one with a smaller id
                if site_id > survivor:
                    np.subtract(total, pairwise, out=total)
                else:
                    np.add(total, pairwise, out=total)
        total &= mask
        return total.astype(np.int64)

    @staticmethod
    def _rebuild(shares: list[bytes], what: str) -> bytes:
        """Combine Shamir shares (ValueError when they do not combine)."""
        try:
            return combine_shares(shares)
        except (ValueError, IndexError) as error:
            raise ValueError(f"{what} did not rebuild from the shares ({error}): a share is bad") from None

    def to_dict(self) -> dict[str, ConfigValue]:
        """ConfigRecord values (masked vectors as little-endian uint64 bytes)."""
        ids = sorted(self.public_keys)
        senders, destinations, ciphertexts = [], [], []
        for src in sorted(self.ciphertexts):
            for dst in sorted(self.ciphertexts[src]):
                senders.append(src)
                destinations.append(dst)
                ciphertexts.append(self.ciphertexts[src][dst])
        masked_ids = sorted(self.masked)
        return {
            "threshold": self.threshold,
            "bits": self.bits,
            "stage": self.stage,
            "key-site-ids": ids,
            "enc-public-keys": [self.public_keys[i].enc_public_key for i in ids],
            "mask-public-keys": [self.public_keys[i].mask_public_key for i in ids],
            "ciphertext-senders": senders,
            "ciphertext-destinations": destinations,
            "ciphertexts": ciphertexts,
            "round-sites": list(self.round_sites),
            "masked-site-ids": masked_ids,
            "masked-vectors": [self.masked[i].astype("<u8").tobytes() for i in masked_ids],
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> SecureSumServer:
        """The inverse of :meth:`to_dict` (ValueError for a malformed record)."""
        what = "SecureSumServer"
        server = cls(_read_value(record, "threshold", "int", what), _read_value(record, "bits", "int", what))
        stage = _read_value(record, "stage", "str", what)
        if stage not in SERVER_STAGES:
            raise ValueError(f"{what}['stage'] = {stage!r} is none of {SERVER_STAGES}: use {what}.to_dict()")
        server.stage = stage
        enc = _read_mapping(record, "key-site-ids", "enc-public-keys", what)
        mask = _read_mapping(record, "key-site-ids", "mask-public-keys", what)
        server.public_keys = {site_id: PublicKeys(enc[site_id], mask[site_id]) for site_id in enc}
        senders = _read_value(record, "ciphertext-senders", "ints", what)
        destinations = _read_value(record, "ciphertext-destinations", "ints", what)
        ciphertexts = _read_value(record, "ciphertexts", "bytes-list", what)
        if not len(senders) == len(destinations) == len(ciphertexts):
            raise ValueError(f"{what}: the ciphertext lists differ in length: use {what}.to_dict()")
        for src, dst, ciphertext in zip(senders, destinations, ciphertexts):
            server.ciphertexts.setdefault(src, {})[dst] = ciphertext
        server.round_sites = _read_value(record, "round-sites", "ints", what)
        masked = _read_mapping(record, "masked-site-ids", "masked-vectors", what)
        server.masked = {i: np.frombuffer(v, dtype="<u8").astype(np.uint64) for i, v in masked.items()}
        server.survivors = _read_value(record, "survivors", "ints", what)
        server.dropped = _read_value(record, "dropped", "ints", what)
        return server
