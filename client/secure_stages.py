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
sent, and is removed after the unmask answer (and any left by an earlier
round is removed when a new round starts).

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
    "the round has fewer sites than this site's minimum of honest sites (secagg-min-honest): it takes no part in, "
    "and never helps unmask, a secure sum of fewer sites"
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
    folder = path.parent
    if folder.exists():
        for stale in folder.glob("*.state"):
            stale.unlink(missing_ok=True)
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
    """Stage 2: the encrypted shares for the other sites (state saved first); refuses a round below the minimum."""
    minimum = minimum_honest(config, policy)
    path = state_path(state, run_id, server_round)
    protocol = load_protocol_state(path)
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
    are fewer than :func:`minimum_honest`.
    """
    minimum = minimum_honest(config, policy)
    path = state_path(state, run_id, server_round)
    protocol = load_protocol_state(path)
    parsed = _protocol_call(lambda: MaskRequest.from_dict(request))
    if len(set(parsed.round_sites)) < minimum:
        raise SecureStageError(TOO_FEW_HONEST)

    def mask(words: np.ndarray) -> np.ndarray:
        masked = _protocol_call(lambda: protocol.mask_input(parsed, np.asarray(words).astype(np.int64)))
        save_protocol_state(path, protocol)
        return masked

    return SecureRound(config.honest_sites, config.num_sites, config.max_train_examples, parsed.bits, mask)


def unmask(
    state: SiteState,
    run_id: int,
    server_round: int,
    request: Mapping[str, Any],
    config: RunConfig,
    policy: SitePolicy,
) -> dict[str, Any]:
    """Stage 4: this site's shares for the server, if at least :func:`minimum_honest` sites survived; state removed.

    Any refusal of the protocol (fewer survivors than the threshold or the
    minimum, a site both survivor and dropped, a share of the other kind
    revealed before) is answered with a fixed reason.
    """
    minimum = minimum_honest(config, policy)
    path = state_path(state, run_id, server_round)
    protocol = load_protocol_state(path)
    parsed = _protocol_call(lambda: UnmaskRequest.from_dict(request))
    if len(set(parsed.survivors)) < minimum:
        raise SecureStageError(TOO_FEW_HONEST)
    reply = _protocol_call(lambda: protocol.reveal_shares(parsed, min_survivors=minimum))
    save_protocol_state(path, protocol)  # the record of revealed shares is on disk before the answer leaves
    path.unlink(missing_ok=True)  # the round is over for this site: a repeated request finds no state
    return reply.to_dict()


def _protocol_call(call):
    """Run one protocol step; its ValueError (whose text stays in the site's log) becomes the fixed refusal."""
    try:
        return call()
    except ValueError as err:
        log(WARNING, "fedcl: secure aggregation: refused a request: %s", err)
        raise SecureStageError(PROTOCOL_BROKEN) from None
