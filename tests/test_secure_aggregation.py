"""Secure aggregation (fedcl/secure_aggregation.py): the sum is exact, the server's view looks random, sites refuse.

References: sums computed with Python ints, RFC 8439's ChaCha20 test vector, the sites' true secrets, the uniform
distribution. Site ids include values above 2**63 (Flower node ids are uint64).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from Crypto.Util.Padding import pad
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedcl.secure_aggregation import (
    INPUT_MASKED,
    KEYS_SHARED,
    PAIR_MASK_TAG,
    SELF_MASK_TAG,
    EncryptedShares,
    MaskRequest,
    PublicKeys,
    SecureSumServer,
    ShareKeysRequest,
    SiteState,
    UnmaskReply,
    UnmaskRequest,
    prg_mask,
)

IDS = [3, 42, 2**63 + 5, 12345678901234567890, 2**64 - 1]  # ascending; three above 2**63
THRESHOLD, BITS, LENGTH = 3, 20, 4000
M = 2**BITS

# RFC 8439, appendix A.1, test vector #1: ChaCha20 block, key 0, nonce 0, counter 0
RFC8439_BLOCK = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)


def plain_sum(xs: list[np.ndarray], bits: int) -> list[int]:
    """The reference: the coordinate-wise sum with Python ints, mod 2**bits."""
    return [sum(int(x[k]) for x in xs) % 2**bits for k in range(len(xs[0]))]


def through_flower(record: dict) -> dict:
    """A to_dict() record through a Flower ConfigRecord and its protobuf, as a message would carry it."""
    return dict(config_record_from_proto(config_record_to_proto(ConfigRecord(record))))


@dataclass
class Round:
    """A 5-site round run up to step 3: every state after step 2 and after step 3, as bytes."""

    xs: dict[int, np.ndarray]
    after_share: dict[int, bytes]
    mask_requests: dict[int, dict]
    after_mask: dict[int, bytes]
    server: dict
    masked: dict[int, np.ndarray]

    def site(self, site_id: int, stage: str = INPUT_MASKED) -> SiteState:
        return SiteState.from_bytes((self.after_mask if stage == INPUT_MASKED else self.after_share)[site_id])


@pytest.fixture(scope="module")
def five_sites() -> Round:
    rng = np.random.default_rng(7)
    xs = {i: rng.integers(0, M, LENGTH, dtype=np.int64) for i in IDS}
    xs[IDS[0]] = np.zeros(LENGTH, dtype=np.int64)  # the extremes: a masked vector must not betray them
    xs[IDS[1]] = np.full(LENGTH, M - 1, dtype=np.int64)
    server = SecureSumServer(THRESHOLD, BITS)
    states = {i: SiteState.start(i) for i in IDS}
    for i, state in states.items():
        server.add_public_keys(i, state.advertised_keys())
    request = server.share_keys_request()
    for i, state in states.items():
        server.add_encrypted_shares(i, state.share_keys(request))
    after_share = {i: state.to_bytes() for i, state in states.items()}
    mask_requests = {i: server.mask_request(i).to_dict() for i in IDS}
    masked = {}
    for i, state in states.items():
        masked[i] = state.mask_input(MaskRequest.from_dict(mask_requests[i]), xs[i])
        server.add_masked_vector(i, masked[i])
    return Round(xs, after_share, mask_requests, {i: s.to_bytes() for i, s in states.items()}, server.to_dict(), masked)


def unmask_request_for(five_sites: Round) -> tuple[SecureSumServer, UnmaskRequest]:
    server = SecureSumServer.from_dict(five_sites.server)
    return server, server.unmask_request()


def test_prg_is_the_chacha20_keystream_of_rfc8439() -> None:
    reference = np.frombuffer(RFC8439_BLOCK, dtype="<u8")
    for bits in (62, 20, 1):
        expected = [int(v) % 2**bits for v in reference]
        assert prg_mask(bytes(32), bytes(12), 8, bits).tolist() == expected
    # the two kinds of mask use different keystreams of one key; values cover [0, 16) uniformly (chi-square, 15 df)
    key = bytes(range(32))
    assert not np.array_equal(prg_mask(key, SELF_MASK_TAG, 64, 62), prg_mask(key, PAIR_MASK_TAG, 64, 62))
    counts = np.bincount(prg_mask(key, SELF_MASK_TAG, 16000, 4).astype(np.int64), minlength=16)
    assert ((counts - 1000) ** 2 / 1000).sum() < 45  # p < 1e-4 for uniform values


def test_five_sites_sum_is_exact_and_the_server_sees_only_noise(five_sites: Round) -> None:
    server, request = unmask_request_for(five_sites)
    assert request == UnmaskRequest(IDS, [])
    replies = {i: five_sites.site(i).reveal_shares(request, min_survivors=5) for i in IDS}
    total = server.unmask({i: UnmaskReply.from_dict(through_flower(r.to_dict())) for i, r in replies.items()})
    assert total.dtype == np.int64
    assert total.tolist() == plain_sum(list(five_sites.xs.values()), BITS)

    # no masked vector is its x, each is spread over [0, M) and no closer to its x than a uniform vector would be
    for i, y in five_sites.masked.items():
        x = five_sites.xs[i]
        assert y.dtype == np.int64 and 0 <= y.min() and y.max() < M
        assert np.mean(y == x) < 0.01
        counts = np.bincount(y >> (BITS - 4), minlength=16)  # the top 4 bits: 16 bins of LENGTH / 16
        assert ((counts - LENGTH / 16) ** 2 / (LENGTH / 16)).sum() < 45
        distance = np.minimum((y - x) % M, (x - y) % M)  # circular distance: M / 4 on average for uniform y
        assert abs(distance.mean() / M - 0.25) < 0.02
    zeros, top = five_sites.masked[IDS[0]], five_sites.masked[IDS[1]]
    assert abs(zeros.mean() / M - 0.5) < 0.03 and abs(top.mean() / M - 0.5) < 0.03
    assert abs(np.corrcoef(zeros, top)[0, 1]) < 0.1

    # nothing the server holds contains a seed, a private key or a share in the clear
    secrets = []
    for i in IDS:
        state = five_sites.site(i)
        secrets += [state.secrets.seed, state.secrets.mask_private_key, state.secrets.enc_private_key]
        secrets += [state.own_seed_share, state.own_mask_key_share]
    held = [v for v in five_sites.server.values() if isinstance(v, bytes)]
    held += [b for v in five_sites.server.values() if isinstance(v, list) for b in v if isinstance(b, bytes)]
    assert held
    assert not any(secret in blob for secret in secrets for blob in held)


def test_sites_dropping_at_each_step_leave_the_sum_of_the_survivors() -> None:
    ids = [10, 20, 30, 40, 50, 60, 70, 80, 2**64 - 2]
    threshold, bits, length = 5, 24, 300
    after_keys, after_shares, lost_masked, no_reply = 20, 40, 60, 2**64 - 2
    rng = np.random.default_rng(3)
    xs = {i: rng.integers(0, 2**bits, length, dtype=np.int64) for i in ids}
    server = SecureSumServer(threshold, bits)
    states = {i: SiteState.start(i) for i in ids}
    for i in ids:
        server.add_public_keys(i, states[i].advertised_keys())
    request = server.share_keys_request()
    for i in ids:
        if i != after_keys:  # advertised keys, then left
            server.add_encrypted_shares(i, states[i].share_keys(request))
    for i in ids:
        if i in (after_keys, after_shares):  # after_shares left after step 2
            continue
        masked = states[i].mask_input(server.mask_request(i), xs[i])
        if i != lost_masked:  # computed its masked vector, which never arrived
            server.add_masked_vector(i, masked)
    unmask = server.unmask_request()
    survivors = [10, 30, 50, 70, 80, no_reply]
    assert unmask == UnmaskRequest(survivors, [after_shares, lost_masked])
    replies = {i: states[i].reveal_shares(unmask, min_survivors=3) for i in survivors if i != no_reply}
    assert replies[10].mask_key_shares.keys() == {after_shares, lost_masked}
    assert server.unmask(replies).tolist() == plain_sum([xs[i] for i in survivors], bits)


def test_server_refuses_fewer_than_t_replies(five_sites: Round) -> None:
    server, request = unmask_request_for(five_sites)
    replies = {i: five_sites.site(i).reveal_shares(request, min_survivors=1) for i in IDS[: THRESHOLD - 1]}
    with pytest.raises(ValueError, match="fewer than the threshold 3"):
        server.unmask(replies)
    replies[IDS[-1]] = five_sites.site(IDS[-1]).reveal_shares(request, min_survivors=1)
    assert server.unmask(replies).tolist() == plain_sum(list(five_sites.xs.values()), BITS)


def test_site_never_reveals_both_kinds_of_share_of_one_site(five_sites: Round) -> None:
    site = five_sites.site(IDS[0])
    with pytest.raises(ValueError, match="both as survivors and as dropped"):
        site.reveal_shares(UnmaskRequest(IDS, [IDS[4]]), min_survivors=1)
    first = site.reveal_shares(UnmaskRequest(IDS[:4], [IDS[4]]), min_survivors=1)  # site 4 said to have dropped
    assert first.mask_key_shares.keys() == {IDS[4]}
    site = SiteState.from_bytes(site.to_bytes())  # a fresh process for the next request
    before = site.to_dict()
    with pytest.raises(ValueError, match=rf"already revealed the other kind of share of sites \[{IDS[4]}\]"):
        site.reveal_shares(UnmaskRequest(IDS, []), min_survivors=1)  # now site 4 "survived": its seed share
    assert site.to_dict() == before
    again = site.reveal_shares(UnmaskRequest(IDS[:4], [IDS[4]]), min_survivors=1)  # a retry of the same request
    assert again == first


@pytest.mark.parametrize(
    ("survivors", "dropped", "min_survivors", "message"),
    [
        (IDS, [], 6, "fewer than this site's min_survivors = 6"),
        (IDS[:2], IDS[2:], 1, "2 survivors, fewer than the threshold 3"),
        (IDS[:4], [IDS[4], 99], 1, r"sites \[99\] did not complete step 2"),
        (IDS[:4], [], 1, "neither survivors nor dropped"),
        (IDS[1:], IDS[:1], 1, "listed as dropped, yet it sent its masked vector"),
    ],
)
def test_site_refuses_bad_unmask_requests(
    five_sites: Round, survivors: list[int], dropped: list[int], min_survivors: int, message: str
) -> None:
    site = five_sites.site(IDS[0])
    with pytest.raises(ValueError, match=message):
        site.reveal_shares(UnmaskRequest(survivors, dropped), min_survivors=min_survivors)
    assert site.seed_shares_revealed == [] and site.mask_key_shares_revealed == []


def test_fewer_than_t_shares_do_not_rebuild_a_seed(five_sites: Round) -> None:
    _, request = unmask_request_for(five_sites)
    target = IDS[2]
    seed = five_sites.site(target).secrets.seed
    shares = [five_sites.site(i).reveal_shares(request, min_survivors=1).seed_shares[target] for i in IDS]
    assert combine_shares(shares[:THRESHOLD]) == seed  # t shares rebuild it
    few = shares[: THRESHOLD - 1]
    try:
        assert combine_shares(few) != seed
    except ValueError:
        pass  # Flower's unpadding noticed the garbage
    # interpolating t - 1 shares chunk by chunk (no unpadding) gives bytes unrelated to the padded seed
    chunks = (len(few[0]) - 4) // 16
    guess = b"".join(
        Shamir.combine([(int.from_bytes(s[:4], "little"), s[4 + 16 * c : 20 + 16 * c]) for s in few], ssss=False)
        for c in range(chunks)
    )
    assert guess != pad(seed, 16) and guess[:32] != seed
    mask, guessed_mask = prg_mask(seed, SELF_MASK_TAG, LENGTH, BITS), prg_mask(guess[:32], SELF_MASK_TAG, LENGTH, BITS)
    assert np.mean(mask == guessed_mask) < 0.01


def flip(ciphertext: bytes, position: int, replacement: bytes) -> bytes:
    return ciphertext[:position] + replacement + ciphertext[position + 1 :]


def test_tampered_or_misrouted_shares_are_refused(five_sites: Round) -> None:
    target, sender, other = IDS[3], IDS[1], IDS[4]
    request = MaskRequest.from_dict(five_sites.mask_requests[target])
    x = five_sites.xs[target]
    token = request.ciphertexts[sender]
    middle = len(token) // 2
    swapped = b"B" if token[middle : middle + 1] != b"B" else b"C"  # still valid base64: the HMAC must catch it
    for tampered in (flip(token, middle, bytes([token[middle] ^ 1])), flip(token, middle, swapped)):
        site = five_sites.site(target, KEYS_SHARED)
        bad = MaskRequest(request.round_sites, {**request.ciphertexts, sender: tampered}, request.bits)
        with pytest.raises(ValueError, match=f"cannot decrypt the shares from site {sender}"):
            site.mask_input(bad, x)
        assert site.stage == KEYS_SHARED and site.ciphertexts == {}

    # the server relays to target the ciphertext sender wrote for other
    other_request = MaskRequest.from_dict(five_sites.mask_requests[other])
    misrouted = {**request.ciphertexts, sender: other_request.ciphertexts[sender]}
    with pytest.raises(ValueError, match="cannot decrypt"):
        five_sites.site(target, KEYS_SHARED).mask_input(MaskRequest(request.round_sites, misrouted, BITS), x)

    # correctly encrypted from sender to target, but the plaintext says it is for other (or from other)
    sender_state = five_sites.site(sender, KEYS_SHARED)
    key = generate_shared_key(
        bytes_to_private_key(sender_state.secrets.enc_private_key),
        bytes_to_public_key(sender_state.public_keys[target].enc_public_key),
    )
    for src, dst in ((sender, other), (other, target)):
        forged = encrypt(key, share_keys_plaintext_concat(src, dst, b"s" * 20, b"k" * 20))
        bad = MaskRequest(request.round_sites, {**request.ciphertexts, sender: forged}, BITS)
        with pytest.raises(ValueError, match=f"say they are from site {src} to site {dst}"):
            five_sites.site(target, KEYS_SHARED).mask_input(bad, x)

    # a held ciphertext corrupted on disk between steps 3 and 4 is refused at unmasking
    record = five_sites.site(target).to_dict()
    position = record["ciphertext-site-ids"].index(sender)
    record["ciphertexts"][position] = flip(token, middle, swapped)
    with pytest.raises(ValueError, match=f"cannot decrypt the shares from site {sender}"):
        SiteState.from_dict(record).reveal_shares(UnmaskRequest(IDS, []), min_survivors=1)


def test_state_and_messages_survive_a_fresh_process_per_stage(tmp_path) -> None:
    ids, threshold, bits, length = [5, 2**63 + 1, 2**64 - 1], 2, 16, 50
    rng = np.random.default_rng(11)
    xs = {i: rng.integers(0, 2**bits, length, dtype=np.int64) for i in ids}

    def save(state: SiteState) -> None:
        (tmp_path / f"{state.site_id}.state").write_bytes(state.to_bytes())

    def load(site_id: int) -> SiteState:
        state = SiteState.from_bytes((tmp_path / f"{site_id}.state").read_bytes())
        assert SiteState.from_dict(through_flower(state.to_dict())) == state
        return state

    def server_process(server: SecureSumServer) -> SecureSumServer:
        return SecureSumServer.from_dict(through_flower(server.to_dict()))

    server = SecureSumServer(threshold, bits)
    for i in ids:
        state = SiteState.start(i)
        save(state)
        server.add_public_keys(i, PublicKeys.from_dict(through_flower(state.advertised_keys().to_dict())))
    server = server_process(server)
    request = ShareKeysRequest.from_dict(through_flower(server.share_keys_request().to_dict()))
    for i in ids:
        state = load(i)
        shares = state.share_keys(request)
        save(state)
        server.add_encrypted_shares(i, EncryptedShares.from_dict(through_flower(shares.to_dict())))
    server = server_process(server)
    for i in ids:
        state = load(i)
        masked = state.mask_input(MaskRequest.from_dict(through_flower(server.mask_request(i).to_dict())), xs[i])
        save(state)
        server.add_masked_vector(i, masked)
    server = server_process(server)
    unmask = UnmaskRequest.from_dict(through_flower(server.unmask_request().to_dict()))
    replies = {}
    for i in ids:
        state = load(i)
        replies[i] = UnmaskReply.from_dict(through_flower(state.reveal_shares(unmask, min_survivors=2).to_dict()))
        save(state)
        assert load(i).seed_shares_revealed == sorted(ids)  # the record of revealed shares reached the disk
    assert server_process(server).unmask(replies).tolist() == plain_sum(list(xs.values()), bits)
    with pytest.raises(ValueError, match="write it with to_bytes"):
        SiteState.from_bytes(b"not a state")


@pytest.mark.parametrize("bits", [1, 20, 62])
def test_sums_wrap_around_mod_two_to_the_bits(bits: int) -> None:
    ids, length, m = [1, 2, 3], 64, 2**bits
    rng = np.random.default_rng(bits)
    xs = {i: m - 1 - rng.integers(0, min(m // 2, 8), length, dtype=np.int64) for i in ids}  # near M - 1
    assert all(sum(int(xs[i][k]) for i in ids) >= m for k in range(length))
    server = SecureSumServer(2, bits)
    states = {i: SiteState.start(i) for i in ids}
    for i in ids:
        server.add_public_keys(i, states[i].advertised_keys())
    request = server.share_keys_request()
    for i in ids:
        server.add_encrypted_shares(i, states[i].share_keys(request))
    for i in ids:
        server.add_masked_vector(i, states[i].mask_input(server.mask_request(i), xs[i]))
    unmask = server.unmask_request()
    replies = {i: states[i].reveal_shares(unmask, min_survivors=3) for i in ids}
    assert server.unmask(replies).tolist() == plain_sum(list(xs.values()), bits)


def test_sites_and_server_refuse_unsafe_key_lists(five_sites: Round) -> None:
    states = {i: SiteState.start(i) for i in IDS[:4]}
    keys = {i: s.advertised_keys() for i, s in states.items()}
    site = states[IDS[0]]
    for threshold in (2, 5):  # 2t <= n, t > n
        with pytest.raises(ValueError, match=f"threshold {threshold} for 4 sites"):
            site.share_keys(ShareKeysRequest(threshold, keys))
    with pytest.raises(ValueError, match="own public keys unchanged"):
        site.share_keys(ShareKeysRequest(3, {**keys, IDS[0]: keys[IDS[1]]}))
    with pytest.raises(ValueError, match="two advertised public keys are equal"):
        site.share_keys(ShareKeysRequest(3, {**keys, IDS[2]: keys[IDS[1]]}))
    assert site.stage == "keys-advertised" and site.public_keys == {}
    server = SecureSumServer(2, BITS)
    for i, k in keys.items():
        server.add_public_keys(i, k)
    with pytest.raises(ValueError, match="needs n / 2 < t <= n"):
        server.share_keys_request()

    # step 3: the round sites must be exactly this site and the senders of its ciphertexts
    request = MaskRequest.from_dict(five_sites.mask_requests[IDS[0]])
    fewer = {i: c for i, c in request.ciphertexts.items() if i != IDS[1]}
    with pytest.raises(ValueError, match="do not come from exactly the other round sites"):
        five_sites.site(IDS[0], KEYS_SHARED).mask_input(MaskRequest(IDS, fewer, BITS), five_sites.xs[IDS[0]])
    with pytest.raises(ValueError, match="fewer than the threshold 3"):
        five_sites.site(IDS[0], KEYS_SHARED).mask_input(MaskRequest(IDS[:2], {}, BITS), five_sites.xs[IDS[0]])
    with pytest.raises(ValueError, match="outside"):
        five_sites.site(IDS[0], KEYS_SHARED).mask_input(request, np.full(5, M, dtype=np.int64))


def test_pairwise_keys_agree_in_both_directions(five_sites: Round) -> None:
    a, b = five_sites.site(IDS[0]), five_sites.site(IDS[4])

    def agreed(me: SiteState, peer: SiteState) -> bytes:
        shared = generate_shared_key(
            bytes_to_private_key(me.secrets.mask_private_key),
            bytes_to_public_key(peer.advertised_keys().mask_public_key),
        )
        return base64.urlsafe_b64decode(shared)

    assert agreed(a, b) == agreed(b, a) and len(agreed(a, b)) == 32
