"""Registering a site's public key with the SuperLink (`flwr supernode register`), as the coordinator does it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedcl.pilot.commands import register_command
from fedcl.pilot.connection import Connection, check_reachable
from fedcl.pilot.errors import PilotError
from fedcl.pilot.flwr_cli import call_flwr, error_message
from fedcl.pilot.pki import check_site_name, load_site_public_key, public_key_fingerprint

ALREADY_REGISTERED = "Public key already in use"  # Flower's answer (code 23) to a key it has registered before


@dataclass(frozen=True)
class Registration:
    """The outcome: the node id the SuperLink gave the key (empty if it was registered before), and its fingerprint."""

    site_name: str
    node_id: str
    fingerprint: str
    already_registered: bool


def register_site(site_name: str, public_key: Path, connection: Connection, flwr_home: Path) -> Registration:
    """Register ``public_key`` as site ``site_name`` with the SuperLink; return the node id it was given.

    The key is checked first (an OpenSSH ECDSA public key on a NIST curve:
    what Flower accepts), then the SuperLink is reached and its certificate
    verified, then ``flwr supernode register`` runs through the pilot
    connection written into ``flwr_home``. A key registered before is
    reported as such (``already_registered``), not as an error. Raises
    :class:`PilotError` for anything else the SuperLink refuses.
    """
    check_site_name(site_name)
    if connection.insecure:
        raise PilotError(
            "registering a site needs a SuperLink with TLS and SuperNode authentication; an --insecure SuperLink "
            "accepts any SuperNode and has nothing to register"
        )
    fingerprint = public_key_fingerprint(load_site_public_key(public_key))
    check_reachable(connection)
    answer = call_flwr(register_command(Path(public_key).resolve(), site_name), connection, flwr_home)
    if answer.get("success"):
        return Registration(site_name, str(answer.get("node-id", "")), fingerprint, already_registered=False)
    message = error_message(answer)
    if ALREADY_REGISTERED in message:
        return Registration(site_name, "", fingerprint, already_registered=True)
    raise PilotError(f"the SuperLink refused to register {site_name}'s key: {message}")
