"""Registering a site's public key with the SuperLink (`flwr supernode register`), as the coordinator does it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedcl.atomic_files import write_json_atomic
from fedcl.pilot.commands import register_command
from fedcl.pilot.connection import Connection, check_reachable
from fedcl.pilot.errors import PilotError
from fedcl.pilot.flwr_cli import call_flwr, error_message
from fedcl.pilot.pki import check_site_name, load_site_public_key, public_key_fingerprint

ALREADY_REGISTERED = "Public key already in use"  # Flower's answer (code 23) to a key it has registered before
REGISTRY = "registered-sites.json"  # in the coordinator's Flower home: site name -> the node id its key was given


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
        done = Registration(site_name, str(answer.get("node-id", "")), fingerprint, already_registered=False)
        record_registration(flwr_home, done)
        return done
    message = error_message(answer)
    if ALREADY_REGISTERED in message:
        return Registration(site_name, "", fingerprint, already_registered=True)
    raise PilotError(f"the SuperLink refused to register {site_name}'s key: {message}")


def record_registration(flwr_home: Path, registration: Registration) -> None:
    """Remember (atomically) which node id the SuperLink gave a site's key; a registration without an id is kept out."""
    if not registration.node_id.isdigit():
        return
    nodes = registered_nodes(flwr_home)
    nodes[registration.site_name] = int(registration.node_id)
    write_json_atomic(Path(flwr_home) / REGISTRY, nodes)


def registered_nodes(flwr_home: Path) -> dict[str, int]:
    """Site name -> node id of every site registered through this Flower home ({} when none)."""
    path = Path(flwr_home) / REGISTRY
    if not path.exists():
        return {}
    try:
        return {str(name): int(node) for name, node in json.loads(path.read_text(encoding="utf-8")).items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise PilotError(f"{path} is damaged ({err}); delete it and register the sites again") from err


def site_nodes_value(nodes: dict[str, int]) -> str:
    """The run config's ``site-nodes`` value for these registrations: ``"a=12,b=34"``."""
    return ",".join(f"{name}={node}" for name, node in sorted(nodes.items()))
