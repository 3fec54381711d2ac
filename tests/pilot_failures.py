"""Failures done to a running pilot, and what a test reads back afterwards: for tests/test_deployment_failures.py.

A host crash is a SIGKILL of the SuperNode and of everything it started at
the same instant (its SuperExec and the app process), so nothing gets to
deregister or finish a reply. A restart uses the site's same key, node config
and state folder. What the test reads back: the messages each SuperNode
handled (from its own timed output), the run's metrics rows, and a fresh
Opacus computation of a ledger's epsilon.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from client.privacy_ledger import PrivacyLedger
from client.site_state import SiteState
from fedcl.pilot.errors import PilotError
from fedcl.pilot.poc import LocalFederation
from fedcl.pilot.processes import ManagedProcess
from fedcl.pilot.run_log import MessageSpan, message_spans
from fedcl.pilot.site import ACTIVATION_REFUSED

NODE_ID = re.compile(r"SuperNode ID: (\d+)")


def crash(process: ManagedProcess) -> list[int]:
    """SIGKILL ``process`` and every descendant at once (a host losing power); return the pids killed.

    The descendants are listed before any signal (the SuperExec runs in a
    session of its own and would otherwise be missed).
    """
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            os.kill(member.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    psutil.wait_procs([member for member in tree if member.pid != process.pid], timeout=10)
    return [member.pid for member in tree]


def spans(processes: Iterable[ManagedProcess]) -> list[MessageSpan]:
    """Every message the given SuperNode processes (one site's, in the order they ran) received, in order."""
    return [span for process in processes for span in message_spans(process.timed_lines())]


def wait_for_span(process: ManagedProcess, kind: str, count: int, timeout: float, sent: bool = False) -> MessageSpan:
    """Wait until ``process`` has received its ``count``-th ``kind`` message (with ``sent``: and sent the reply).

    Returns that message's span; raises :class:`AssertionError` with the
    output's tail if the process exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = [span for span in message_spans(process.timed_lines()) if span.kind == kind]
        if len(found) >= count and (not sent or found[count - 1].sent_at is not None):
            return found[count - 1]
        if not process.running():
            raise AssertionError(f"{process.name} exited before its {kind} message {count}:\n{process.tail(30)}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{process.name}: no {kind} message {count} within {timeout:.0f} s:\n{process.tail(30)}"
            )
        time.sleep(0.2)


def node_id(process: ManagedProcess) -> int:
    """The node id the SuperLink gave the SuperNode (its ``SuperNode ID: N`` line)."""
    for line in process.lines():
        match = NODE_ID.search(line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"{process.name} printed no node id:\n{process.tail()}")


def restart_site(
    federation: LocalFederation, name: str, timeout: float, prefix: tuple[str, ...] = ()
) -> tuple[ManagedProcess, int]:
    """Start site ``name`` again with its own key, node config and folders; return it and the attempts it took.

    Flower 1.42 refuses to activate a node id whose earlier session it still
    counts as online: after a crash that lasts until two heartbeats are missed
    (up to 60 s; the interval is fixed in 1.42, no flag shortens it), with
    the same refusal code as an unknown key. Each refused attempt is retried
    after a short pause, as a service manager (systemd
    ``Restart=on-failure``) would, until ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        try:
            return federation.start_supernode(name, prefix), attempts
        except PilotError as err:
            if ACTIVATION_REFUSED not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)  # a refused start itself takes ~5 s (a SuperNode starting, then refused)


def site_processes(federation: LocalFederation, name: str) -> list[ManagedProcess]:
    """Every SuperNode process started for site ``name`` that got a node id (the crashed one, then its restart)."""
    return [
        process
        for process in federation.group.processes
        if process.name == name and any(NODE_ID.search(line) for line in process.lines())
    ]


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows, in file order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def site_rows(run_dir: Path, site: str) -> dict[int, dict[str, Any]]:
    """Site ``site``'s row of each round (round number -> row)."""
    return {row["round"]: row for row in metric_rows(run_dir) if row.get("site") == site}


def ledger(state_dir: Path) -> PrivacyLedger:
    """The site's privacy ledger as it is on its disk."""
    return PrivacyLedger.load(SiteState(state_dir).ledger)


def opacus_epsilon(history: list[tuple[float, float, int]], order: float, delta: float) -> float:
    """Epsilon of ``history`` at RDP order ``order``, computed afresh by Opacus' own analysis (not the ledger's code).

    Opacus' ``compute_rdp`` of each (noise multiplier, sample rate, steps)
    entry, summed (composition), then Opacus' ``get_privacy_spent`` at that
    one order: the conversion the site's RDP filter reports.
    """
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = sum(
        float(compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=[order])[0])
        for sigma, rate, steps in history
    )
    with warnings.catch_warnings():  # Opacus warns that one order is the "smallest alpha": it is the only one
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = get_privacy_spent(orders=[order], rdp=[rdp], delta=delta)
    return float(epsilon) if math.isfinite(epsilon) else math.inf
