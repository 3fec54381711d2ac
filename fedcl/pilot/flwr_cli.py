"""Calling the `flwr` command through the pilot's connection and reading its JSON answers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcl.pilot.connection import Connection, write_connection
from fedcl.pilot.environment import flower_environment
from fedcl.pilot.errors import PilotError
from fedcl.pilot.processes import run_command


def json_answer(output: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` call printed (the last one, after any other text)."""
    start = output.find("{")
    while start != -1:
        try:
            answer = json.loads(output[start:])
        except json.JSONDecodeError:
            start = output.find("\n{", start + 1)
            start = start + 1 if start != -1 else -1
            continue
        if isinstance(answer, dict):
            return answer
        break
    raise PilotError(f"`flwr` printed no JSON answer:\n{output[-2000:]}")


def call_flwr(
    command: Sequence[str], connection: Connection, flwr_home: Path, timeout: float = 120.0, cwd: Path | None = None
) -> dict[str, Any]:
    """Write the pilot connection into ``flwr_home``, run ``command`` (a ``flwr ... --format json`` call), return its answer.

    Flower answers ``{"success": false, "error-message": ...}`` with exit
    code 0 on a refused call: the caller checks ``success``.
    """
    write_connection(flwr_home, connection)
    done = run_command(command, flower_environment(flwr_home), timeout=timeout, cwd=cwd)
    return json_answer(done.stdout + "\n" + done.stderr if "{" not in done.stdout else done.stdout)


def error_message(answer: dict[str, Any]) -> str:
    """The error of a refused ``flwr`` call, on one line, without Flower's "Using SuperLink" preamble."""
    text = str(answer.get("error-message", "unknown error"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Using SuperLink")]
    return " ".join(lines) or text
