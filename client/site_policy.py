"""The site's own privacy policy and state directory: from its node config, never from the server.

A SuperNode is started by the site's operator with ``--node-config``; that is
where the site's policy lives:

- ``state-dir``: where the site keeps its ledger, sentinel, replay buffer and
  EWC state (kept across restarts, backed up by the operator). Required
  outside a simulation: a site without one refuses to train.
- ``dp`` (default true), ``target-epsilon`` (8), ``delta`` (1e-5),
  ``accountant`` ("rdp": the RDP filter, ``client/privacy_ledger.py``): the
  site's budget for its whole life. Missing keys take these site defaults,
  never the server's values.
- ``nominal-records``: the site's public record count, from which every
  sample rate is computed. Default: the size of the site's training split,
  which is then declared public (README).
- ``secagg-min-honest`` (0: none of its own): under secure aggregation, the
  fewest sites the site lets a secure sum hold (``client/secure_stages.py``):
  a run whose ``secagg-min-honest`` is lower is refused.
- ``secagg-max-colluders`` (0: none of its own): under secure aggregation, the
  most sites the site assumes may collude with the server; it uses
  ``max(the run's secagg-max-colluders, this floor)`` and takes part only in
  sums of at least ``n_h + c`` sites.

Both floors default to 0, so by default the site accepts the server's
proposal for ``n_h`` and ``c``: a site that does not trust the run's values
sets its own floors.

The run config may *propose* ``dp``, ``target-epsilon``, ``delta`` and
``accountant``; a proposal that disagrees with the site's policy is refused
with one line naming both values (:func:`check_proposal`). No path sent by the
server is ever written to.

In a simulation the launcher (``simulations/run.py``) is the operator of every
virtual site: it passes, through the environment variable
``FEDCL_SIMULATION_SITES`` (JSON: ``state-root`` and ``policy``), a state
root under which virtual site ``partition-id`` keeps ``site-<id>/``, and the
policy it gives every virtual site. Node config keys still win. A real
SuperNode must never run with that variable in its environment: its
defaults would then come from it (the process cannot tell a simulation's
worker from a SuperNode by itself).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcl.run_config import ACCOUNTANTS, ConfigError, RunConfig

SIMULATION_ENV = "FEDCL_SIMULATION_SITES"
POLICY_KEYS = ("dp", "target-epsilon", "delta", "accountant")
SITE_DEFAULTS: dict[str, Any] = {"dp": True, "target-epsilon": 8.0, "delta": 1e-5, "accountant": "rdp"}


@dataclass(frozen=True)
class SitePolicy:
    """What the site decides for itself: its privacy budget, its state directory, its public size."""

    dp: bool
    target_epsilon: float
    delta: float
    accountant: str
    state_dir: Path
    nominal_records: int  # 0: the training split's size, declared public
    secagg_min_honest: int = 0  # the fewest sites in a secure sum this site takes part in; 0: the run's n_h
    secagg_max_colluders: int = 0  # the most sites this site assumes collude with the server; 0: the run's c

    def __post_init__(self) -> None:
        if not (
            isinstance(self.target_epsilon, (int, float))
            and math.isfinite(self.target_epsilon)
            and self.target_epsilon > 0
        ):
            raise ConfigError(f"node config 'target-epsilon' = {self.target_epsilon!r}: use a positive epsilon, e.g. 8")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"node config 'delta' = {self.delta!r}: use 0 < delta < 1, well below 1/records")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"node config 'accountant' = {self.accountant!r}: use rdp (the site's RDP filter)")
        if self.nominal_records < 0:
            raise ConfigError(
                f"node config 'nominal-records' = {self.nominal_records!r}: use the site's public "
                "record count (or 0: the training split's size, declared public)"
            )
        if self.secagg_min_honest < 0:
            raise ConfigError(
                f"node config 'secagg-min-honest' = {self.secagg_min_honest!r}: use 0 (the run's) or the fewest sites "
                "this site trusts to add their noise share, e.g. 3"
            )
        if self.secagg_max_colluders < 0:
            raise ConfigError(
                f"node config 'secagg-max-colluders' = {self.secagg_max_colluders!r}: use 0 (the run's) or the most "
                "sites this site assumes may collude with the server, e.g. 1"
            )

    def nominal(self, actual_records: int) -> int:
        """The public record count every sample rate uses: ``nominal-records``, else the split's size."""
        return self.nominal_records or max(int(actual_records), 1)


def _coerce_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"node config '{key}' = {value!r}: use true or false")


def simulation_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """What the simulation launcher hands its virtual sites (``FEDCL_SIMULATION_SITES``), or {} outside one."""
    raw = environ.get(SIMULATION_ENV, "")
    if not raw:
        return {}
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"environment {SIMULATION_ENV} is not JSON ({err}); it is set by simulations.run") from err
    return settings if isinstance(settings, dict) else {}


def site_policy(node_config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> SitePolicy:
    """The site's policy: node config keys, else the simulation launcher's, else the site defaults.

    Raises :class:`ConfigError` when there is no state directory (outside a
    simulation: node config ``state-dir`` is required) or a value is invalid.
    """
    environ = os.environ if environ is None else environ
    simulation = simulation_settings(environ)
    launcher_policy = simulation.get("policy", {}) if isinstance(simulation.get("policy"), dict) else {}
    values = {key: node_config.get(key, launcher_policy.get(key, SITE_DEFAULTS[key])) for key in POLICY_KEYS}
    configured = str(node_config.get("state-dir", "") or "")
    if configured:
        folder = Path(configured).expanduser()
    elif simulation.get("state-root") and "partition-id" in node_config:
        folder = Path(str(simulation["state-root"])) / f"site-{int(node_config['partition-id'])}"
    else:
        raise ConfigError(
            "node config 'state-dir' is missing: a site keeps its privacy ledger there across runs and restarts; "
            "start the SuperNode with --node-config \"state-dir='/path/kept/and/backed/up' ...\""
        )
    try:
        return SitePolicy(
            dp=_coerce_bool("dp", values["dp"]),
            target_epsilon=float(values["target-epsilon"]),
            delta=float(values["delta"]),
            accountant=str(values["accountant"]),
            state_dir=folder,
            nominal_records=int(node_config.get("nominal-records", 0)),
            secagg_min_honest=int(node_config.get("secagg-min-honest", 0)),
            secagg_max_colluders=int(node_config.get("secagg-max-colluders", 0)),
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            f"node config: {err}; use numbers for target-epsilon, delta, nominal-records, secagg-min-honest and "
            "secagg-max-colluders"
        ) from err


def check_proposal(policy: SitePolicy, config: RunConfig) -> None:
    """Refuse a run whose proposed privacy settings disagree with the site's policy (one line naming both)."""
    proposed = {
        "dp": config.dp,
        "target-epsilon": config.target_epsilon,
        "delta": config.delta,
        "accountant": config.accountant,
    }
    own = {
        "dp": policy.dp,
        "target-epsilon": policy.target_epsilon,
        "delta": policy.delta,
        "accountant": policy.accountant,
    }
    for key, value in proposed.items():
        if value != own[key]:
            raise ConfigError(
                f"the run proposes {key} = {value!r} but this site's policy (node config) says {own[key]!r}; "
                f"the site decides: run with {key}={own[key]!r}, or change the site's node config"
            )
