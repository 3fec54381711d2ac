"""A hospital's SuperNode: its node config and key checked, the SuperLink reached, then `flower-supernode` started."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from fedcl.pilot.commands import DEFAULT_SITE_RUNTIME_PORT, supernode_command
from fedcl.pilot.connection import Connection, check_reachable
from fedcl.pilot.environment import flower_environment
from fedcl.pilot.errors import PilotError
from fedcl.pilot.node_config import SiteNodeConfig
from fedcl.pilot.pki import load_site_private_key
from fedcl.pilot.processes import ManagedProcess, ProcessFailed, ProcessGroup

CONNECTED = r"SuperNode ID: \d+"  # flower-supernode's line once the SuperLink has accepted (activated) it
FAILED = (r"Exit Code",)  # an unregistered key (code 2004), no key (2001), a bad key file...
CONNECT_TIMEOUT = 90.0
START_ATTEMPTS = 3  # a connection that failed without the SuperLink's answer (a loaded machine) is started again
RETRY_PAUSE = 3.0
ACTIVATION_REFUSED = "code 2004"  # in the PilotError of a refused activation (an unknown key, or a node still online)


def start_site(
    group: ProcessGroup,
    connection: Connection,
    private_key: Path | None,
    node_config: SiteNodeConfig,
    flwr_home: Path,
    runtime_port: int = DEFAULT_SITE_RUNTIME_PORT,
    log_path: Path | None = None,
    echo: TextIO | None = None,
    wait_connected: bool = True,
    max_retries: int | None = None,
    prefix: Sequence[str] = (),
) -> ManagedProcess:
    """Start the site's ``flower-supernode`` in ``group``; with ``wait_connected``, wait until the SuperLink accepts it.

    Checks first, each failure one :class:`PilotError` line: the key file
    loads as Flower loads it (none only with ``--insecure``), the SuperLink
    answers and presents the pilot CA's certificate. The node config must
    already be checked (:func:`fedcl.pilot.node_config.check_node_config`).
    The SuperNode's environment has no ``FEDCL_SIMULATION_SITES``.
    ``prefix`` goes in front of the command, e.g. ``["ip", "netns", "exec",
    "site-a"]`` to run the site in a network namespace of its own (the
    checks above still run here, in the caller's namespace).
    """
    if connection.insecure:
        if private_key is not None:
            raise PilotError(
                "--insecure turns authentication off with TLS: drop --key, or drop --insecure (the default)"
            )
    else:
        if private_key is None:
            raise PilotError(
                f"the site needs its private key: --key {node_config.site_name}.key (made by `fedcl site keys`)"
            )
        load_site_private_key(private_key)
    check_reachable(connection)
    node_config.state_dir.mkdir(parents=True, exist_ok=True)
    command = [
        *prefix,
        *supernode_command(
            connection, private_key, node_config.to_argument(), runtime_port=runtime_port, max_retries=max_retries
        ),
    ]
    for attempt in range(1, START_ATTEMPTS + 1):
        process = group.start(
            node_config.site_name, command, flower_environment(flwr_home), log_path=log_path, echo=echo
        )
        if not wait_connected:
            return process
        try:
            process.wait_for(CONNECTED, CONNECT_TIMEOUT, fail_patterns=FAILED)
            return process
        except ProcessFailed as err:
            process.stop()
            if attempt < START_ATTEMPTS and transient(err):
                time.sleep(RETRY_PAUSE)
                continue
            raise PilotError(f"site {node_config.site_name} was not accepted by the SuperLink: {refusal(err)}") from err
    raise AssertionError("unreachable: the last attempt returns or raises")


def transient(err: ProcessFailed) -> bool:
    """True for a connection that failed without an answer from the SuperLink (exit 305 with no Flower error code).

    Seen on a loaded machine: the activation request times out before the
    SuperLink answers. A refusal (an unknown key: code 2004; no key: 2001)
    carries a code and is never retried.
    """
    text = str(err)
    return "Exit Code: 305" in text and "[code:" not in text


def refusal(err: ProcessFailed) -> str:
    """The SuperLink's reason in one line when it can be read from the SuperNode's output, else the whole error."""
    text = str(err)
    if "2004" in text:  # Flower sends the same code for an unknown key and for a node id it still counts as online
        return (
            f"the SuperLink refused to activate it ({ACTIVATION_REFUSED}): its key is not registered (ask the "
            "coordinator to run `fedcl site register NAME KEY.pub`), or a SuperNode with this key is still "
            "connected: one running elsewhere, or one that stopped without signing off (a crash, a lost network) "
            "less than ~60 s ago, until it misses two heartbeats; stop the other one, or start again in a minute"
        )
    if "2001" in text:
        return "the SuperLink requires authentication: start the site with --key"
    return text
