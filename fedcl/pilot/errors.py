"""The one error type of the pilot tooling: an operator's mistake, with the fix in its one-line message."""

from __future__ import annotations


class PilotError(ValueError):
    """A wrong input or a refused action (a file that exists, a missing key, a bad address); the message names the fix."""
