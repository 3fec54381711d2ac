"""The secure-aggregation trust model at the site's stages: ``n_h + c`` survivors, stale secrets, the server's floor.

The site's own stage functions (``client/secure_stages.py``) answer a real
``SecureSumServer`` (``fedcl/secure_aggregation.py``): no model, no data.
The reviewer's scenario (B1): four sites, ``n_h = 2``, threshold 3; sites 3
and 4 collude with the server and honest site 2 drops after stage 2, so the
survivors {1, 3, 4} reach the threshold and ``n_h`` but the sum holds one
honest share. With ``secagg-max-colluders = 2`` site 1 refuses to unmask it.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.secure_stages import (
    TOO_FEW_HONEST,
    SecureStageError,
    advertise_keys,
    mask_stage,
    required_survivors,
    share_keys,
    state_path,
    unmask,
)
from client.site_policy import SitePolicy
from client.site_state import open_state
from fedcl.protocol import SECAGG_RECORD, SITE_RECORD
from fedcl.run_config import ConfigError, RunConfig, parse_run_config
from fedcl.secure_aggregation import EncryptedShares, PublicKeys, SecureSumServer, UnmaskReply, UnmaskRequest
from fedcl.secure_ncm import threshold
from strategies.secure_rounds import SecureRounds

BITS = 40
SITES = (1, 2, 3, 4)


def config_of(sites: int = 4, **keys) -> RunConfig:
    return parse_run_config({"num-sites": sites, "recipe": "ncm", "secure-aggregation": True, **keys})


def policy_of(config: RunConfig, folder, **floors) -> SitePolicy:
    return SitePolicy(config.dp, config.target_epsilon, config.delta, "rdp", folder, 0, **floors)


def masked_round(tmp_path, config: RunConfig, drop: tuple[int, ...], **floors):
    """Stages 1-3 for every site in :data:`SITES`; the sites in ``drop`` never send their words.

    Returns the server (at stage 4), each site's (state, policy).
    """
    server = SecureSumServer(threshold(len(SITES)), BITS)
    sites = {}
    for site in SITES:
        policy = policy_of(config, tmp_path / f"site-{site}", **floors)
        state = open_state(policy.state_dir)
        sites[site] = (state, policy)
        keys = advertise_keys(state, 1, 1, {}, config, policy, site_id=site)
        server.add_public_keys(site, PublicKeys.from_dict(keys))
    request = server.share_keys_request().to_dict()
    for site, (state, policy) in sites.items():
        server.add_encrypted_shares(site, EncryptedShares.from_dict(share_keys(state, 1, 1, request, config, policy)))
    for site, (state, policy) in sites.items():
        secure = mask_stage(state, 1, 1, server.mask_request(site).to_dict(), config, policy)
        words = secure.mask(np.full(5, site, dtype=np.int64))
        if site not in drop:
            server.add_masked_vector(site, words)
    return server, sites


def test_the_reviewers_scenario_is_refused_with_two_colluders_and_unmasked_with_none(tmp_path):
    # c = 2: the survivors {1, 3, 4} are 3 < n_h + c = 4, whatever the threshold says: site 1 refuses.
    config = config_of(**{"secagg-min-honest": 2, "secagg-max-colluders": 2})
    server, sites = masked_round(tmp_path / "c2", config, drop=(2,))
    request = server.unmask_request()
    assert request.survivors == [1, 3, 4] and len(request.survivors) >= server.threshold
    for site in request.survivors:
        state, policy = sites[site]
        with pytest.raises(SecureStageError, match="secagg-max-colluders"):
            unmask(state, 1, 1, request.to_dict(), config, policy)

    # c = 0 (the old behaviour): three survivors >= n_h = 2 and t = 3, the sum of 1, 3 and 4 unmasks.
    config = config_of(**{"secagg-min-honest": 2})
    server, sites = masked_round(tmp_path / "c0", config, drop=(2,))
    request = server.unmask_request().to_dict()
    replies = {}
    for site in (1, 3, 4):
        state, policy = sites[site]
        replies[site] = UnmaskReply.from_dict(unmask(state, 1, 1, request, config, policy))
    assert np.array_equal(server.unmask(replies), np.full(5, 1 + 3 + 4))


def test_one_dropout_is_allowed_and_two_are_refused_with_n_h_2_and_c_1(tmp_path):
    config = config_of(**{"secagg-min-honest": 2, "secagg-max-colluders": 1})
    server, sites = masked_round(tmp_path / "one", config, drop=(4,))
    request = server.unmask_request().to_dict()  # 3 survivors >= n_h + c = 3
    for site in (1, 2, 3):
        state, policy = sites[site]
        assert unmask(state, 1, 1, request, config, policy)

    # two drop: 2 survivors < 3 (the protocol's threshold 3 refuses too; the site refuses first, with its reason)
    _, sites = masked_round(tmp_path / "two", config, drop=(3, 4))
    request = UnmaskRequest([1, 2], [3, 4]).to_dict()
    for site in (1, 2):
        state, policy = sites[site]
        with pytest.raises(SecureStageError) as refused:
            unmask(state, 1, 1, request, config, policy)
        assert str(refused.value) == TOO_FEW_HONEST


def test_a_sites_own_colluder_floor_raises_the_survivors_it_needs(tmp_path):
    config = config_of(**{"secagg-min-honest": 2})  # the run says c = 0
    policy = policy_of(config, tmp_path, secagg_max_colluders=2)
    assert required_survivors(config, policy) == 4
    assert required_survivors(config, policy_of(config, tmp_path)) == 2
    server, sites = masked_round(tmp_path / "floor", config, drop=(2,), secagg_max_colluders=2)
    state, policy = sites[1]
    with pytest.raises(SecureStageError):
        unmask(state, 1, 1, server.unmask_request().to_dict(), config, policy)


def test_the_site_refuses_stages_2_and_3_with_fewer_than_n_h_plus_c_sites(tmp_path):
    config = config_of(**{"secagg-min-honest": 2, "secagg-max-colluders": 2})
    server = SecureSumServer(2, BITS)
    sites = {}
    for site in (1, 2, 3):
        policy = policy_of(config, tmp_path / f"site-{site}")
        sites[site] = (open_state(policy.state_dir), policy)
        server.add_public_keys(
            site, PublicKeys.from_dict(advertise_keys(sites[site][0], 1, 1, {}, config, policy, site_id=site))
        )
    request = server.share_keys_request().to_dict()
    state, policy = sites[1]
    with pytest.raises(SecureStageError, match="secagg-max-colluders"):
        share_keys(state, 1, 1, request, config, policy)  # 3 sites < n_h + c = 4


def test_the_servers_floor_is_max_of_its_threshold_and_n_h_plus_c():
    rounds = SecureRounds(2, BITS, 1.0, colluders=2)
    assert rounds.required(SecureSumServer(3, BITS)) == 4
    assert SecureRounds(2, BITS, 1.0).required(SecureSumServer(3, BITS)) == 3
    assert SecureRounds(2, BITS, 1.0, colluders=1).required(SecureSumServer(4, BITS)) == 4


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"secagg-max-colluders": 3}, "num-sites - 2"),
        ({"secagg-max-colluders": -1}, "secagg-max-colluders"),
        ({"secagg-min-honest": 3, "secagg-max-colluders": 2}, "secagg-min-honest"),
        ({"secagg-max-colluders": 1}, "at most num-sites"),  # n_h defaults to num-sites: 4 + 1 > 4
    ],
)
def test_the_run_config_bounds_the_colluders(keys, match):
    with pytest.raises(ConfigError, match=match):
        config_of(**keys)


def test_the_colluders_default_to_none():
    config = config_of()
    assert (config.secagg_max_colluders, config.required_survivors) == (0, 4)
    assert config_of(**{"secagg-min-honest": 2, "secagg-max-colluders": 2}).required_survivors == 4


def test_any_secure_stage_removes_other_rounds_secrets_and_stale_temporary_files(tmp_path):
    config = config_of(**{"secagg-min-honest": 2})
    policy = policy_of(config, tmp_path)
    state = open_state(tmp_path)
    advertise_keys(state, 1, 1, {}, config, policy, site_id=1)  # round 1 never reaches its unmask
    old = state_path(state, 1, 1)
    stale_tmp = old.parent / ".run-1-round-1.state.abc123.tmp"
    stale_tmp.write_bytes(b"secret")
    assert old.exists()
    with pytest.raises(SecureStageError):  # a stage of round 2 with no state of its own still cleans up
        share_keys(state, 1, 2, {}, config, policy)
    assert not old.exists() and not stale_tmp.exists()

    advertise_keys(state, 1, 3, {}, config, policy, site_id=1)
    advertise_keys(state, 2, 1, {}, config, policy, site_id=1)  # stage 1 of another run's round
    assert sorted(p.name for p in old.parent.iterdir()) == ["run-2-round-1.state"]


def test_a_duplicate_key_among_six_sites_fails_the_round_cleanly(tmp_path, task_identity):
    """C4: the threshold is the server's (from six advertised), never recomputed from the five keys kept."""
    from fake_grid import ScriptedGrid

    from client.app import secagg_keys, secagg_shares

    config = {"num-sites": 6, "recipe": "ncm", "secure-aggregation": True, "secagg-min-honest": 2}
    nodes = list(range(1, 7))
    contexts = {
        n: Context(
            run_id=1,
            node_id=n,
            node_config={"state-dir": str(tmp_path / f"s{n}")},
            state=RecordDict(),
            run_config=config,
        )
        for n in nodes
    }
    first_keys: dict = {}

    def answer_for(node, answer_shares=True):
        def answer(message: Message):
            kind = message.metadata.message_type
            if kind.endswith("secagg_keys"):
                reply = secagg_keys(message, contexts[node])
                if node == 1:
                    first_keys.update(dict(reply.content.config_records[SECAGG_RECORD]))
                if node == 6:  # site 6 repeats site 1's keys
                    content = RecordDict(
                        {
                            SITE_RECORD: reply.content.config_records[SITE_RECORD],
                            SECAGG_RECORD: ConfigRecord(first_keys),
                        }
                    )
                    return Message(content=content, reply_to=message)
                return reply
            return secagg_shares(message, contexts[node]) if answer_shares else None

        return answer

    # t = 4 of the six advertised; 5 keys kept; two of them never answer stage 2: 3 < t, the round fails cleanly
    grid = ScriptedGrid({n: answer_for(n, answer_shares=n not in (4, 5)) for n in nodes})
    rounds = SecureRounds(2, BITS, 1.0, max_sites=6)
    session = rounds.open(grid, 1, nodes, {})
    assert session.server is None and not session.requests
    assert "needs 4" in session.failure and "already in use" in session.dropped[6]

    # every kept site answers: the round goes on with five at the server's threshold 4
    for context in contexts.values():
        context.run_id = 2
    grid = ScriptedGrid({n: answer_for(n) for n in nodes})
    session = rounds.open(grid, 2, nodes, {})
    assert session.server is not None and session.server.threshold == 4 and sorted(session.requests) == [1, 2, 3, 4, 5]


def test_a_round_asks_at_most_num_sites_nodes(tmp_path, task_identity):
    """C3: the word width is computed for num-sites; a node over it is left out of the round."""
    rounds = SecureRounds(2, BITS, 1.0, max_sites=2)
    grid = SilentGrid()
    session = rounds.open(grid, 1, [5, 3, 9], {})
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [3, 5]
    assert "num-sites" in session.dropped[9]


class SilentGrid:
    """A grid on which no node answers (what was sent is kept)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.sent.extend(messages)
        return []


def test_the_word_width_covers_a_proposed_noise_multiplier_above_the_budgets_largest():
    """C5: server and site compute the width at max(noise-multiplier, MAX_NOISE_MULTIPLIER); m6: a fixed reason."""
    from client.secure_release import BITS_TOO_NARROW, BitWidthError, SecureRound, check_bit_width, distributed_release
    from fedcl.secure_ncm import MAX_NOISE_MULTIPLIER, server_bits

    z = 4 * MAX_NOISE_MULTIPLIER
    release = distributed_release(z, 3, 769, range(5), None)
    wide = server_bits(3, 40, 3, z)
    assert wide > server_bits(3, 40, 3) == server_bits(3, 40, 3, 1.0)
    check_bit_width(release, SecureRound(3, 3, 40, wide, lambda words: words), 5 * 769)
    with pytest.raises(BitWidthError) as refused:
        check_bit_width(release, SecureRound(3, 3, 40, server_bits(3, 40, 3), lambda words: words), 5 * 769)
    assert str(refused.value) == BITS_TOO_NARROW


def test_the_site_computes_its_width_for_every_site_in_the_round(tmp_path):
    """C3: a round of more sites than num-sites is checked for all of them (the server asks at most num-sites)."""
    config = config_of(3, **{"secagg-min-honest": 2})
    server = SecureSumServer(threshold(len(SITES)), BITS)
    sites = {}
    for site in SITES:  # four sites in a run of num-sites = 3
        policy = policy_of(config, tmp_path / f"site-{site}")
        sites[site] = (open_state(policy.state_dir), policy)
        keys = advertise_keys(sites[site][0], 1, 1, {}, config, policy, site_id=site)
        server.add_public_keys(site, PublicKeys.from_dict(keys))
    request = server.share_keys_request().to_dict()
    for site, (state, policy) in sites.items():
        server.add_encrypted_shares(site, EncryptedShares.from_dict(share_keys(state, 1, 1, request, config, policy)))
    state, policy = sites[1]
    assert mask_stage(state, 1, 1, server.mask_request(1).to_dict(), config, policy).num_sites == 4


def test_a_run_whose_width_cannot_hold_the_sum_is_refused_at_parse():
    with pytest.raises(ConfigError, match="max-train-examples"):
        config_of(3, **{"noise-multiplier": 1e30})
