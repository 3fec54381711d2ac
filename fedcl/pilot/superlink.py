"""The coordinator's SuperLink: its certificates checked, then `flower-superlink` started with TLS and SuperNode auth."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fedcl.pilot.commands import superlink_command
from fedcl.pilot.environment import flower_environment
from fedcl.pilot.errors import PilotError
from fedcl.pilot.pki import ALWAYS_HOSTS, PkiFiles, certificate_names
from fedcl.pilot.processes import ManagedProcess, ProcessFailed, ProcessGroup
from fedcl.pilot.secret_files import make_private_folder

READY = r"Uvicorn running on"  # flower-superlink's line once it accepts connections
FAILED = (r"Exit Code", r"address already in use", r"Errno 98")  # what it prints when it cannot start
START_TIMEOUT = 90.0


def check_server_certificates(certs: PkiFiles) -> list[str]:
    """Check the SuperLink's certificate folder; return the names (DNS and IP) its certificate is valid for.

    Raises :class:`PilotError` with the fix if a file is missing, the key
    does not belong to the certificate, the CA did not sign it, it is not valid
    now, or it lacks 127.0.0.1 (the SuperLink's ServerApp process connects back
    to it there, through TLS).
    """
    for path in (certs.ca_certificate, certs.server_certificate, certs.server_key):
        if not path.is_file():
            raise PilotError(f"{path} is missing; make the certificates with `fedcl pki init --out {certs.folder}`")
    try:
        ca = x509.load_pem_x509_certificate(certs.ca_certificate.read_bytes())
        cert = x509.load_pem_x509_certificate(certs.server_certificate.read_bytes())
        key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    except ValueError as err:
        raise PilotError(
            f"{certs.folder}: cannot read the certificates ({err}); make them with `fedcl pki init`"
        ) from err
    if key.public_key() != cert.public_key():
        raise PilotError(
            f"{certs.server_key} is not the key of {certs.server_certificate}; make a new pair with pki init"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise PilotError(
            f"{certs.server_certificate} is not signed by {certs.ca_certificate}; sites would refuse it. "
            "Issue it again with `fedcl pki init --reuse-ca --force`"
        ) from err
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PilotError(
            f"{certs.server_certificate} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now; renew it with `fedcl pki init --reuse-ca --force`"
        )
    names = certificate_names(certs.server_certificate)
    if ALWAYS_HOSTS[1] not in names:
        raise PilotError(
            f"{certs.server_certificate} is not valid for 127.0.0.1, where the SuperLink's own ServerApp reaches it; "
            "make it with `fedcl pki init` (which always adds localhost and 127.0.0.1)"
        )
    return names


def site_facing_names(names: list[str]) -> list[str]:
    """The certificate's names that other machines can use (not localhost or a loopback address)."""
    remote = []
    for name in names:
        try:
            if ipaddress.ip_address(name).is_loopback:
                continue
        except ValueError:
            if name == "localhost":
                continue
        remote.append(name)
    return remote


def start_superlink(
    group: ProcessGroup,
    certs: PkiFiles | None,
    host: str,
    port: int,
    flwr_home: Path,
    database: Path | None = None,
    log_path: Path | None = None,
    echo: TextIO | None = None,
    prefix: Sequence[str] = (),
) -> ManagedProcess:
    """Start ``flower-superlink`` in ``group`` and wait until it accepts connections; return the process.

    ``certs`` None means ``--insecure``: plaintext and no SuperNode
    authentication. Raises :class:`PilotError` if it exits or reports a
    failure (the port in use, a bad certificate) before it is ready.
    ``prefix`` goes in front of the command, e.g. ``["ip", "netns", "exec",
    "coordinator"]`` to run it in a network namespace of its own.
    """
    if certs is not None:
        check_server_certificates(certs)
    if database is not None:
        make_private_folder(database.parent)  # the database holds the runs' messages (model updates): owner only
    process = group.start(
        "superlink",
        [*prefix, *superlink_command(certs, host, port, database)],
        flower_environment(flwr_home),
        log_path=log_path,
        echo=echo,
    )
    try:
        process.wait_for(READY, START_TIMEOUT, fail_patterns=FAILED)
    except ProcessFailed as err:
        process.stop()
        raise PilotError(f"the SuperLink did not start on {host}:{port}: {err}") from err
    return process
