"""How the pilot's `flwr` commands reach the SuperLink: an address, the CA, and a connection in the pilot's FLWR_HOME.

`flwr supernode register`, `flwr run`, `flwr ls` and `flwr log` take the name
of a SuperLink connection that Flower 1.42 reads from ``$FLWR_HOME/config.toml``
(``[superlink.<name>]`` with ``address``, ``root-certificates``, ``insecure``).
The pilot writes its own connection there, in its own FLWR_HOME, so the
operator's ``~/.flwr`` is never touched.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from fedcl.pilot.errors import PilotError

CONNECTION_NAME = "fedcl-pilot"


@dataclass(frozen=True)
class SuperLinkAddress:
    """``host:port`` of the SuperLink as sites and the coordinator reach it."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Connection:
    """A SuperLink address with its transport security: the CA to verify it with, or plaintext."""

    address: SuperLinkAddress
    root_cert: Path | None  # None only with insecure
    insecure: bool

    def __post_init__(self) -> None:
        if self.insecure and self.root_cert is not None:
            raise PilotError("--insecure turns TLS off: drop --root-cert, or drop --insecure to keep TLS (the default)")
        if not self.insecure and self.root_cert is None:
            raise PilotError(
                "TLS is on by default: pass --root-cert ca.pem (the pilot CA), or --insecure for plaintext"
            )
        if self.root_cert is not None and not self.root_cert.is_file():
            raise PilotError(f"--root-cert {self.root_cert}: no such file; ask the coordinator for the pilot's ca.pem")


def parse_address(text: str) -> SuperLinkAddress:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address); :class:`PilotError` with an example otherwise."""
    raw = text.strip()
    host, sep, port_text = raw.rpartition(":")
    if raw.startswith("[") and "]" in raw:
        host, _, rest = raw[1:].partition("]")
        sep, port_text = (":", rest[1:]) if rest.startswith(":") else ("", "")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            sep = ""
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise PilotError(f"--superlink {text!r}: write HOST:PORT, e.g. superlink.example.org:8000 or 10.0.0.5:8000")
    return SuperLinkAddress(host, int(port_text))


def connection_from_args(superlink: str, root_cert: str | None, insecure: bool) -> Connection:
    """A checked :class:`Connection` from the command-line values (``--superlink``, ``--root-cert``, ``--insecure``)."""
    return Connection(parse_address(superlink), Path(root_cert).expanduser().resolve() if root_cert else None, insecure)


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


def write_connection(flwr_home: Path, connection: Connection, name: str = CONNECTION_NAME) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (the default); return its path.

    The file is the pilot's own (its FLWR_HOME is not the user's): it is
    rewritten whole each time, so it always names the SuperLink of the
    command at hand.
    """
    lines = ["[superlink]", f"default = {_toml_string(name)}", "", f"[superlink.{name}]"]
    lines.append(f"address = {_toml_string(str(connection.address))}")
    if connection.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_string(str(connection.root_cert))}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_reachable(connection: Connection, timeout: float = 5.0) -> None:
    """Check that the SuperLink answers, and with TLS that its certificate is the pilot CA's for that name.

    Raises :class:`PilotError` with the cause in one line: nothing listens
    there, the certificate is not signed by ``--root-cert``, or it is not
    valid for the host name used. Flower itself would only retry silently.
    """
    host, port = connection.address.host, connection.address.port
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise PilotError(
            f"cannot reach the SuperLink at {connection.address} ({err.strerror or err}); check that it runs "
            "(`fedcl superlink start`), the address and port, and that the firewall lets this machine through"
        ) from err
    with raw:
        if connection.insecure:
            return
        context = ssl.create_default_context(cafile=str(connection.root_cert))
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as err:
            raise PilotError(
                f"the SuperLink at {connection.address} is not the pilot's: {err.verify_message}. Use the ca.pem the "
                "coordinator sent, and a host name or address its certificate lists (`fedcl pki init --hosts`)"
            ) from err
        except (ssl.SSLError, OSError) as err:
            raise PilotError(
                f"no TLS from {connection.address} ({err}); the SuperLink may run with --insecure "
                "(then pass --insecure here too, for a test only)"
            ) from err
