"""Where a site keeps what must survive a restart: its state directory.

Node config ``state-dir`` names it in a deployment (the site operator must keep
and back it up: it holds the privacy ledger). In a simulation each site gets
``<run-dir>/sites/<site>/``. Every file in it is written atomically.
"""

from __future__ import annotations

import json
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


PRIVATE_METRICS = ("train-loss",)  # computed from private records without noise: never leave the site under DP


def keep_private_metrics(metrics: Mapping[str, float], state: SiteState, server_round: int) -> dict[str, float]:
    """Append the metrics DP does not cover to the site's local log; return the ones that may be released.

    The training loss is an average over the site's private batch with no
    noise: sending it would leak outside the ledger, so under DP it stays in
    ``<state-dir>/local_metrics.jsonl`` for the site operator.
    """
    kept = {k: v for k, v in metrics.items() if k in PRIVATE_METRICS}
    if kept:
        with (state.folder / "local_metrics.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps({"round": server_round, **kept}) + "\n")
    return {k: v for k, v in metrics.items() if k not in PRIVATE_METRICS}


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
