"""When a run stops and how it ends: the failed-round streak, and the verdict summary.json reports.

A round is failed when too few sites replied usably (the strategy decides
and says why). ``max-failed-rounds`` failed rounds in a row stop the run. A
run ends ``completed`` when it ran all its rounds and at least one round
accepted an update; otherwise ``failed``, with the reason. The ServerApp
signals a failed run to Flower by raising :class:`RunFailed` out of its main
function: Flower then records the run as ``finished:failed`` with the
message as its details (``flwr ls``) and the ServerApp process exits non-zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COMPLETED, FAILED = "completed", "failed"


class RunFailed(RuntimeError):
    """The run stopped or ended without a usable result; the message is the one-line reason."""


class RoundGuard:
    """Counts failed rounds in a row and rounds with an accepted update; decides when the run stops."""

    def __init__(self, max_failed_rounds: int) -> None:
        if max_failed_rounds < 1:
            raise ValueError(f"max_failed_rounds = {max_failed_rounds}: use a whole number of at least 1")
        self.max_failed_rounds = max_failed_rounds
        self.streak = 0  # failed rounds in a row, up to the last round recorded
        self.failed_rounds: list[int] = []
        self.updated_rounds = 0  # rounds whose aggregated update was kept
        self.last_failure = ""

    def record(self, server_round: int, failure: str | None, updated: bool) -> str | None:
        """Record one round's outcome; returns the reason to stop the run, or None to go on."""
        self.updated_rounds += int(updated)
        if failure is None:
            self.streak = 0
            return None
        self.streak += 1
        self.failed_rounds.append(server_round)
        self.last_failure = f"round {server_round}: {failure}"
        if self.streak < self.max_failed_rounds:
            return None
        return (
            f"stopped after {self.streak} failed rounds in a row (max-failed-rounds = {self.max_failed_rounds}); "
            f"the last, {self.last_failure}"
        )

    def verdict(self, stopped: str | None) -> tuple[str, str | None]:
        """``(status, failure_reason)`` for summary.json, given the stop reason if the run was stopped."""
        if stopped:
            return FAILED, stopped
        if self.updated_rounds == 0:
            last = f"; the last failure, {self.last_failure}" if self.last_failure else ""
            return FAILED, f"no round accepted an update: the run trained nothing{last}"
        return COMPLETED, None

    def state(self) -> dict[str, Any]:
        """JSON-ready state for the checkpoint."""
        return {
            "streak": self.streak,
            "failed_rounds": list(self.failed_rounds),
            "updated_rounds": self.updated_rounds,
            "last_failure": self.last_failure,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self.streak = int(state.get("streak", 0))
        self.failed_rounds = [int(r) for r in state.get("failed_rounds", [])]
        self.updated_rounds = int(state.get("updated_rounds", 0))
        self.last_failure = str(state.get("last_failure", ""))
