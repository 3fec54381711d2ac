"""Where a site keeps what must survive a restart: its state directory (``client/site_policy.py`` names it).

The folder holds the privacy ledger, the sentinel, the replay buffer and its
key, the EWC state, the site's local log of values that never leave it, and
derived caches. Every file in it is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SiteState:
    """Paths of one site's durable files."""

    folder: Path

    @property
    def ledger(self) -> Path:
        """The privacy ledger (every private mechanism the site ever ran)."""
        return self.folder / "privacy_ledger.json"

    @property
    def sentinel(self) -> Path:
        """Written after every ledger save: the site has trained, and its step count so far."""
        return self.folder / "trained.sentinel"

    @property
    def lock(self) -> Path:
        """Held (flock) for a whole training round: one training at a time per state directory."""
        return self.folder / "site.lock"

    @property
    def noise_hint(self) -> Path:
        """The noise multiplier the site's budget last chose (kept while the plan fits; the ledger guards)."""
        return self.folder / "noise.json"

    @property
    def last_round(self) -> Path:
        """The run and server round the site last trained (a replayed round of that run is declined)."""
        return self.folder / "last_round.json"

    @property
    def local_metrics(self) -> Path:
        """Values computed from private records without noise: for the site operator, never sent."""
        return self.folder / "local_metrics.jsonl"

    @property
    def data_fingerprint(self) -> Path:
        """A digest of the records the site trains and evaluates on (``client/data_fingerprint.py``)."""
        return self.folder / "data.fingerprint"

    def training_files(self) -> list[Path]:
        """State files that only a site that has trained can have (a ledger must exist beside them)."""
        from client.ewc import EWC_FILE
        from client.replay_buffer import BUFFER_FILE, KEY_FILE

        files = (
            self.folder / BUFFER_FILE,
            self.folder / KEY_FILE,
            self.folder / EWC_FILE,
            self.noise_hint,
            self.local_metrics,
        )
        return [path for path in files if path.exists()]


def open_state(folder: Path) -> SiteState:
    """The state directory at ``folder``, created if missing."""
    folder.mkdir(parents=True, exist_ok=True)
    return SiteState(folder)


def log_local_metrics(state: SiteState, server_round: int, metrics: Mapping[str, float]) -> None:
    """Append values computed from private records without noise to ``local_metrics.jsonl``; they never leave.

    The site operator reads them there (e.g. the training loss under DP).
    """
    if metrics:
        with state.local_metrics.open("a", encoding="utf-8") as log:
            log.write(json.dumps({"round": server_round, **metrics}) + "\n")
