"""The command lines of the Flower processes the pilot starts: built here, in one place, from checked inputs."""

from __future__ import annotations

from pathlib import Path

from fedcl.pilot.connection import CONNECTION_NAME, Connection
from fedcl.pilot.environment import flower_script
from fedcl.pilot.pki import PkiFiles

DEFAULT_SUPERLINK_PORT = 8000  # Flower 1.42's default: Fleet, Control and Runtime APIs on one HTTPS port
DEFAULT_SITE_RUNTIME_PORT = 9094  # Flower's default local port of a SuperNode's runtime API (127.0.0.1 only)


def superlink_command(
    certs: PkiFiles | None,
    host: str,
    port: int,
    database: Path | None,
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (``certs``), or plaintext without both (None).

    Flower refuses SuperNode authentication without TLS, so ``certs=None``
    (``--insecure``) turns both off. ``database`` keeps registrations and runs
    across restarts (None: in memory). Runtime dependency installation is off.
    """
    command = [flower_script("flower-superlink")]
    if certs is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(certs.ca_certificate),
            "--ssl-certfile",
            str(certs.server_certificate),
            "--ssl-keyfile",
            str(certs.server_key),
            "--enable-supernode-auth",
        ]
    command += ["--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if database is not None:
        command += ["--database", str(database)]
    return command


def supernode_command(
    connection: Connection,
    private_key: Path | None,
    node_config: str,
    runtime_port: int = DEFAULT_SITE_RUNTIME_PORT,
    max_retries: int | None = None,
) -> list[str]:
    """``flower-supernode`` for one site: the SuperLink's address, TLS (the pilot CA) or plaintext, its key, its node config.

    ``private_key`` is None only with an insecure connection (no
    authentication without TLS). ``runtime_port`` is the SuperNode's local
    port for its app processes: distinct for each SuperNode on one machine.
    ``max_retries`` bounds reconnection attempts (None: retry forever, what a
    site wants when the SuperLink restarts).
    """
    command = [flower_script("flower-supernode"), "--superlink", str(connection.address)]
    if connection.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(connection.root_cert)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    command += ["--node-config", node_config, "--port", str(runtime_port)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    return command


def register_command(public_key: Path, site_name: str) -> list[str]:
    """``flwr supernode register`` of a site's public key with the pilot connection (JSON output)."""
    return [
        flower_script("flwr"),
        "supernode",
        "register",
        str(public_key),
        CONNECTION_NAME,
        "--name",
        site_name,
        "--format",
        "json",
    ]


def list_nodes_command() -> list[str]:
    """``flwr supernode ls`` through the pilot connection (JSON output)."""
    return [flower_script("flwr"), "supernode", "ls", CONNECTION_NAME, "--format", "json"]


def submit_command(project: Path, run_config: str) -> list[str]:
    """``flwr run`` of the fedcl app in ``project`` through the pilot connection (JSON output: the run id)."""
    command = [flower_script("flwr"), "run", str(project), CONNECTION_NAME]
    if run_config.strip():
        command += ["--run-config", run_config]
    return [*command, "--format", "json"]


def run_status_command(run_id: int) -> list[str]:
    """``flwr ls --run-id`` through the pilot connection (JSON output: the run's status)."""
    return [flower_script("flwr"), "ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"]


def log_stream_command(run_id: int) -> list[str]:
    """``flwr log --stream``: the run's ServerApp log, until the run ends."""
    return [flower_script("flwr"), "log", str(run_id), CONNECTION_NAME, "--stream"]
