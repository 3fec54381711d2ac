"""Submitting a fedcl run to the SuperLink (`flwr run`), following its log, and waiting for its status."""

from __future__ import annotations

import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedcl.pilot.commands import log_stream_command, run_status_command, submit_command
from fedcl.pilot.connection import Connection, check_reachable, write_connection
from fedcl.pilot.environment import flower_environment
from fedcl.pilot.errors import PilotError
from fedcl.pilot.flwr_cli import call_flwr, error_message
from fedcl.pilot.processes import ManagedProcess, start_process
from fedcl.run_config import ConfigError, RunConfig, parse_run_config

PROJECT = Path(__file__).resolve().parents[2]  # the fedcl project root (pyproject.toml): the app `flwr run` bundles
FINISHED = "finished"  # Flower's run statuses: pending, starting, running, finished:<completed|failed|stopped>
COMPLETED = "finished:completed"
STATUS_POLL = 2.0  # seconds between status queries (each is a short `flwr ls`)
EXAMPLE = "--run-config \"labels='treatment,symptoms,information' num-sites=2 output-dir='/srv/fedcl/runs/pilot-1'\""


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended: its id, Flower's final status and details, and when it was submitted and ended."""

    run_id: int
    status: str
    details: str
    submitted_at: float
    finished_at: float
    log: tuple[tuple[float, str], ...] = ()  # the ServerApp's log lines with their arrival times, if followed

    @property
    def completed(self) -> bool:
        """Whether the run ended as ``finished:completed`` (the ServerApp returned without an error)."""
        return self.status == COMPLETED


def pyproject_run_defaults(project: Path = PROJECT) -> dict[str, Any]:
    """The run-config defaults the app declares (``[tool.flwr.app.config]`` of the project's pyproject.toml)."""
    with (project / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def check_run_config(text: str, project: Path = PROJECT) -> RunConfig:
    """Check a deployment's run-config overrides here, before anything is sent; return the parsed config.

    Beyond what the run config itself checks (keys, types, ranges), a
    deployment must declare its public label set (``labels``: no site's data
    is read to find it) and an absolute ``output-dir`` (a folder on the
    SuperLink host, where the ServerApp writes the run's report). Raises
    :class:`PilotError` with the fix.
    """
    from flwr.common.config import parse_config_args  # what `flwr run` itself parses the overrides with

    try:
        overrides = dict(parse_config_args([text])) if text.strip() else {}
    except Exception as err:  # Flower raises click's exception type
        raise PilotError(
            f"--run-config {text!r} cannot be read: write key=value pairs and quote text values, e.g. {EXAMPLE}"
        ) from err
    try:
        config = parse_run_config({**pyproject_run_defaults(project), **overrides})
    except ConfigError as err:
        raise PilotError(str(err)) from err
    if not config.label_names:
        raise PilotError(
            "run config has no 'labels': a deployment declares its public label set (the classes, in order; "
            f"no site's data is read to find it), e.g. {EXAMPLE}"
        )
    if not config.output_dir or not Path(config.output_dir).is_absolute():
        raise PilotError(
            f"run config 'output-dir' = {config.output_dir!r}: give an absolute folder on the SuperLink host, where "
            f"the run's report and adapter are written, e.g. {EXAMPLE}"
        )
    return config


def submit_run(connection: Connection, flwr_home: Path, run_config: str, project: Path = PROJECT) -> int:
    """Submit the fedcl app in ``project`` with ``run_config`` overrides; return the run id the SuperLink gave it.

    Reaches the SuperLink first (a wrong address or CA is named in one line),
    then runs ``flwr run`` through the pilot connection in ``flwr_home``.
    Unless the run config names ``site-nodes``, it gets the node ids of the
    sites registered through ``flwr_home`` (so the server accepts each site's
    name only from the node of its registered key). Raises
    :class:`PilotError` if the SuperLink refuses the run.
    """
    from fedcl.pilot.registration import registered_nodes, site_nodes_value

    nodes = registered_nodes(flwr_home)
    if nodes and "site-nodes" not in run_config:
        run_config = f'{run_config} site-nodes="{site_nodes_value(nodes)}"'.strip()
    check_reachable(connection)
    answer = call_flwr(submit_command(project, run_config), connection, flwr_home, timeout=300.0, cwd=project)
    if not answer.get("success") or not answer.get("run-id"):
        raise PilotError(f"the SuperLink did not start the run: {error_message(answer)}")
    return int(answer["run-id"])


def run_status(connection: Connection, flwr_home: Path, run_id: int) -> dict[str, Any]:
    """The run's row as ``flwr ls --run-id`` reports it (``status``, ``status-details``, timestamps, traffic)."""
    answer = call_flwr(run_status_command(run_id), connection, flwr_home)
    runs = answer.get("runs") or []
    if not answer.get("success") or not runs:
        raise PilotError(f"cannot read the status of run {run_id}: {error_message(answer)}")
    return dict(runs[0])


class ProgressLines:
    """A text sink that passes on the ServerApp's ``fedcl:`` lines (a progress line per round, notes) and its errors.

    ``fedcl run submit`` and ``fedcl poc`` show these by default; ``--stream``
    shows Flower's whole log instead.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, text: str) -> int:
        """Forward ``text`` when it holds a ``fedcl:`` line, an ERROR or a traceback; returns its length either way."""
        if "fedcl: " in text:
            self.out.write("fedcl: " + text.split("fedcl: ", 1)[1])
        elif "ERROR" in text or "Traceback" in text:
            self.out.write(text)
        return len(text)

    def flush(self) -> None:
        """Flush the terminal."""
        self.out.flush()


def follow_log(flwr_home: Path, run_id: int, echo: TextIO | None, log_path: Path | None = None) -> ManagedProcess:
    """Start ``flwr log --stream`` for the run (the ServerApp's log, echoed and/or written to ``log_path``).

    The connection must already be written into ``flwr_home``.
    """
    return start_process(
        f"run {run_id}", log_stream_command(run_id), flower_environment(flwr_home), log_path=log_path, echo=echo
    )


def wait_for_run(
    connection: Connection,
    flwr_home: Path,
    run_id: int,
    timeout: float,
    submitted_at: float | None = None,
    stream: TextIO | None = None,
    log_path: Path | None = None,
) -> RunOutcome:
    """Wait until the run's status is ``finished:...`` and return how it ended; stream its log meanwhile if asked.

    Raises :class:`PilotError` after ``timeout`` seconds (the run keeps going
    on the SuperLink: ``flwr stop`` ends it).
    """
    submitted_at = time.time() if submitted_at is None else submitted_at
    write_connection(flwr_home, connection)
    follower = follow_log(flwr_home, run_id, stream, log_path) if (stream or log_path) else None
    deadline = time.monotonic() + timeout
    try:
        while True:
            row = run_status(connection, flwr_home, run_id)
            status = str(row.get("status", ""))
            if status.startswith(FINISHED):
                finished_at = time.time()
                if follower is not None:
                    try:
                        follower.wait(timeout=15)  # the stream ends by itself once the run's logs are all sent
                    except subprocess.TimeoutExpired:
                        pass  # a stuck log stream must not hide the run's outcome: stopped below
                return RunOutcome(
                    run_id,
                    status,
                    str(row.get("status-details", "")),
                    submitted_at,
                    finished_at,
                    tuple(follower.timed_lines()) if follower is not None else (),
                )
            if time.monotonic() > deadline:
                raise PilotError(
                    f"run {run_id} is still {status or 'unknown'} after {timeout:.0f} s; it keeps going on the "
                    f"SuperLink (`FLWR_HOME={flwr_home} flwr stop {run_id} fedcl-pilot` ends it), or wait longer with --timeout"
                )
            time.sleep(STATUS_POLL)
    finally:
        if follower is not None:
            follower.stop(timeout=5)
