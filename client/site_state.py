"""Where a site keeps what must survive a restart: its state directory.

Node config ``state-dir`` names it in a deployment (the site operator must keep
and back it up: it holds the privacy ledger). In a simulation each site gets
``<run-dir>/sites/<site>/``. Every file in it is written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class SiteState:
    """Paths of one site's durable files."""

    folder: Path

    @property
    def ledger(self) -> Path:
        """The privacy ledger (every DP step the site ever took)."""
        return self.folder / "privacy_ledger.json"

    @property
    def noise_plan(self) -> Path:
        """The noise multiplier calibrated for the site's planned schedule."""
        return self.folder / "noise_plan.json"

    def cache(self, name: str) -> Path:
        """A file of derived local data (e.g. cached features); safe to delete."""
        return self.folder / "cache" / name


def site_state(node_config: Mapping[str, Any], run_dir: str, site_name: str) -> SiteState:
    """The site's state directory: node config ``state-dir``, else ``<run-dir>/sites/<site>``."""
    configured = str(node_config.get("state-dir", "") or "")
    if configured:
        folder = Path(configured).expanduser()
    elif run_dir:
        folder = Path(run_dir) / "sites" / site_name
    else:
        raise ValueError(
            "no state directory: start the SuperNode with --node-config \"state-dir=/path/kept/across/restarts\""
        )
    folder.mkdir(parents=True, exist_ok=True)
    return SiteState(folder)
