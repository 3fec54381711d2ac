"""A site's side of the four secure-aggregation stages: its protocol state on disk, its refusals, its answers.

Stages (``fedcl/secure_aggregation.py``), each one Flower message
(``client/app.py``): 1 advertise keys (``train.secagg_keys``), 2 share keys
(``train.secagg_shares``), 3 the masked release (the ncm round's own train
message, carrying the mask request: :func:`mask_stage` gives the site round
its :class:`~client.secure_release.SecureRound`), 4 unmask
(``train.secagg_unmask``).

The protocol state holds the site's private keys and seed: it lives in the
site's state directory (``secagg/run-R-round-K.state``, mode 0600, written
atomically), is saved before each answer is returned, is never logged or
sent, and is removed after the unmask answer; at every stage the states of
other rounds and any stale ``.tmp`` file in the folder are removed
(:func:`remove_stale_states`), so a round that never reached its unmask
leaves its secrets on disk only until the site's next secure stage.

Trust model: at most ``c`` sites (``max(secagg-max-colluders of the run,
the site's own floor)``) collude with the server, and the ledger counts
``n_h`` honest shares (:func:`minimum_honest`). Every stage from 2 on needs at
least ``n_h + c`` sites (:func:`required_survivors`), and the unmask passes
``min_survivors = n_h + c``, so an unmasked sum holds at least ``n_h`` honest
shares whoever drops out.

Refusals carry fixed public reasons, decided by the site's policy and the
public round (never by its records); the protocol's own error text stays in
the site's log.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from client.secure_release import SecureRound
from client.site_policy import SitePolicy
from client.site_state import SiteState
from fedcl.atomic_files import write_bytes_atomic
from fedcl.run_config import RunConfig
from fedcl.secure_aggregation import MaskRequest, ShareKeysRequest, UnmaskRequest
from fedcl.secure_aggregation import SiteState as ProtocolState

STATE_FOLDER = "secagg"
POLICY_DIFFERS = "site privacy policy differs from the run's: secure aggregation needs one policy"
TOO_FEW_HONEST = (
    "the round has fewer sites than this site's minimum of honest sites plus colluders (secagg-min-honest + "
    "secagg-max-colluders): it takes no part in, and never helps unmask, a secure sum of fewer sites"
)
NOT_SECURE = "the run config does not ask for secure aggregation: the site answers no secure-aggregation stage"
PROTOCOL_BROKEN = "the secure-aggregation request does not follow the protocol: the site abandons this round"
NO_STATE = "the site holds no secure-aggregation state for this round (a stage missed or repeated): it abandons it"


class SecureStageError(ValueError):
    """A refused stage; ``str(error)`` is one of the fixed public reasons above."""


def minimum_honest(config: RunConfig, policy: SitePolicy) -> int:
    """The fewest sites a secure sum may hold for this site: ``max(n_h of the run, the site's own minimum)``.

    Raises :class:`SecureStageError` when the run is not secure, when the
    run's privacy policy is not the site's (the ledger entry assumes every
    honest site adds the same noise), or when the run's ``n_h`` is below the
    site's own ``secagg-min-honest``.
    """
    if not config.secure_aggregation:
        raise SecureStageError(NOT_SECURE)
    if (config.target_epsilon, config.delta, config.dp) != (policy.target_epsilon, policy.delta, policy.dp):
        raise SecureStageError(POLICY_DIFFERS)
    if config.honest_sites < policy.secagg_min_honest:
        raise SecureStageError(TOO_FEW_HONEST)
    return max(config.honest_sites, policy.secagg_min_honest)


def colluders(config: RunConfig, policy: SitePolicy) -> int:
    """c: the most sites this site assumes collude with the server: ``max(the run's, the site's own floor)``."""
    return max(config.secagg_max_colluders, policy.secagg_max_colluders)


def required_survivors(config: RunConfig, policy: SitePolicy) -> int:
    """``n_h + c``: the fewest sites this site lets a secure sum hold at stages 2, 3 and 4 (and unmask with).

    With at most ``c`` colluders among them, at least ``n_h`` honest shares
    are in any sum this site helps unmask. Raises :class:`SecureStageError`
    as :func:`minimum_honest` does.
    """
    return minimum_honest(config, policy) + colluders(config, policy)


def remove_stale_states(state: SiteState, run_id: int, server_round: int) -> None:
    """Delete every protocol state in the site's secagg folder but this round's, and any stale ``.tmp`` file.

    A round abandoned before its unmask leaves its secrets on disk; the
    site's next secure stage (of any round) removes them.
    """
    keep = state_path(state, run_id, server_round)
    folder = keep.parent
    if not folder.exists():
        return
    for stale in folder.iterdir():
        if stale != keep and stale.is_file() and (stale.suffix == ".state" or ".tmp" in stale.name):
            stale.unlink(missing_ok=True)


def state_path(state: SiteState, run_id: int, server_round: int) -> Path:
    """Where the protocol state of ``server_round`` of run ``run_id`` lives between stages."""
    return state.folder / STATE_FOLDER / f"run-{int(run_id)}-round-{int(server_round)}.state"


def save_protocol_state(path: Path, protocol: ProtocolState) -> None:
    """Write the protocol state atomically, readable by the site's user only (folder 0700, file 0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    write_bytes_atomic(path, protocol.to_bytes())  # mkstemp creates the file 0600; the rename keeps the mode
    os.chmod(path, 0o600)


def load_protocol_state(path: Path) -> ProtocolState:
    """The saved protocol state; :class:`SecureStageError` (fixed reason) when there is none or it does not parse."""
    try:
        return ProtocolState.from_bytes(path.read_bytes())
    except (OSError, ValueError):
        raise SecureStageError(NO_STATE) from None


def advertise_keys(
    state: SiteState,
    run_id: int,
    server_round: int,
    request: Mapping[str, Any],
    config: RunConfig,
    policy: SitePolicy,
    *,
    site_id: int,
) -> dict[str, Any]:
    """Stage 1: fresh secrets saved for this round (earlier rounds' states removed); the public keys to send.

    ``request`` is empty (stage 1 asks nothing); ``site_id`` is the site's
    Flower node id, the id the server knows it by.
    """
    minimum_honest(config, policy)
    path = state_path(state, run_id, server_round)
    remove_stale_states(state, run_id, server_round)
    path.unlink(missing_ok=True)  # a repeated stage 1 starts afresh
    protocol = ProtocolState.start(int(site_id))
    save_protocol_state(path, protocol)
    return protocol.advertised_keys().to_dict()


def share_keys(
    state: SiteState,
    run_id: int,
    server_round: int,
    request: Mapping[str, Any],
    config: RunConfig,
    policy: SitePolicy,
) -> dict[str, Any]:
    """Stage 2: the encrypted shares for the other sites (state saved first); refuses fewer than ``n_h + c`` sites."""
    minimum, path, protocol = _resume_round(state, run_id, server_round, config, policy)
    parsed = _protocol_call(lambda: ShareKeysRequest.from_dict(request))
    if len(parsed.public_keys) < minimum:
        raise SecureStageError(TOO_FEW_HONEST)
    shares = _protocol_call(lambda: protocol.share_keys(parsed))
    save_protocol_state(path, protocol)
    return shares.to_dict()


def mask_stage(
    state: SiteState,
    run_id: int,
    server_round: int,
    request: Mapping[str, Any],
    config: RunConfig,
    policy: SitePolicy,
) -> SecureRound:
    """Stage 3, before the release: the :class:`SecureRound` whose ``mask`` masks the words and saves the state.

    Refuses (before anything is computed or spent) a round whose step-2 sites
    are fewer than :func:`required_survivors`. The bit width is checked
    against ``max(num-sites, the round's sites)`` (the sum of every site in it).
    """
    minimum, path, protocol = _resume_round(state, run_id, server_round, config, policy)
    parsed = _protocol_call(lambda: MaskRequest.from_dict(request))
    if len(set(parsed.round_sites)) < minimum:
        raise SecureStageError(TOO_FEW_HONEST)

    def mask(words: np.ndarray) -> np.ndarray:
        masked = _protocol_call(lambda: protocol.mask_input(parsed, np.asarray(words).astype(np.int64)))
        save_protocol_state(path, protocol)
        return masked

    sites = max(config.num_sites, len(set(parsed.round_sites)))
    return SecureRound(config.honest_sites, sites, config.max_train_examples, parsed.bits, mask)


def unmask(
    state: SiteState,
    run_id: int,
    server_round: int,
    request: Mapping[str, Any],
    config: RunConfig,
    policy: SitePolicy,
) -> dict[str, Any]:
    """Stage 4: this site's shares for the server, if at least :func:`required_survivors` survived; state removed.

    Any refusal of the protocol (fewer survivors than the threshold or the
    minimum, a site both survivor and dropped, a share of the other kind
    revealed before) is answered with a fixed reason.
    """
    minimum, path, protocol = _resume_round(state, run_id, server_round, config, policy)
    parsed = _protocol_call(lambda: UnmaskRequest.from_dict(request))
    if len(set(parsed.survivors)) < minimum:
        raise SecureStageError(TOO_FEW_HONEST)
    reply = _protocol_call(lambda: protocol.reveal_shares(parsed, min_survivors=minimum))
    save_protocol_state(path, protocol)  # the record of revealed shares is on disk before the answer leaves
    path.unlink(missing_ok=True)  # the round is over for this site: a repeated request finds no state
    return reply.to_dict()


def _resume_round(
    state: SiteState, run_id: int, server_round: int, config: RunConfig, policy: SitePolicy
) -> tuple[int, Path, ProtocolState]:
    """What stages 2-4 start from: the sites required, the round's state file (stale ones removed), its state."""
    minimum = required_survivors(config, policy)
    path = state_path(state, run_id, server_round)
    remove_stale_states(state, run_id, server_round)
    return minimum, path, load_protocol_state(path)


def _protocol_call(call):
    """Run one protocol step; its ValueError (whose text stays in the site's log) becomes the fixed refusal."""
    try:
        return call()
    except ValueError as err:
        log(WARNING, "fedcl: secure aggregation: refused a request: %s", err)
        raise SecureStageError(PROTOCOL_BROKEN) from None
