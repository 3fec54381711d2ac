"""The environment every Flower process of the pilot runs with (SuperLink, SuperNodes, `flwr` commands)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from client.site_policy import SIMULATION_ENV

FLWR_HOME_ENV = "FEDCL_FLWR_HOME"  # overrides the default Flower home folder of `fedcl` commands


def default_flwr_home(role: str) -> Path:
    """Where a ``fedcl`` command keeps Flower's own files for ``role`` (``coordinator`` or a site's name).

    ``$FEDCL_FLWR_HOME/<role>`` if that variable is set, else
    ``~/.fedcl/<role>/flwr-home``. Flower keeps there its connection file
    (``config.toml``) and, on a site, the app bundles the SuperLink sent.
    """
    root = os.environ.get(FLWR_HOME_ENV, "")
    return Path(root).expanduser() / role if root else Path.home() / ".fedcl" / role / "flwr-home"


def flower_environment(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process of the pilot, given ``FLWR_HOME``.

    - ``FLWR_HOME``: the pilot's own Flower folder (made if missing), never the user's ``~/.flwr``;
    - no runtime ``uv sync`` of the app's dependencies (a site installs fedcl and its pinned
      dependencies once; a run must never fetch packages), no telemetry, no update check;
    - this interpreter's scripts first on ``PATH``: Flower starts ``flower-superexec`` and the app
      processes by name, and they must come from the same installation;
    - ``HF_HUB_OFFLINE=1`` (the model ships as a package; nothing is downloaded at run time) unless
      already set, ``TOKENIZERS_PARALLELISM=false``, unbuffered Python output for the logs;
    - ``FEDCL_SIMULATION_SITES`` removed: a real site's policy and state come from its node config
      only (``client/site_policy.py``), never from a simulation launcher's variable.
    """
    env = dict(os.environ if base is None else base)
    env.pop(SIMULATION_ENV, None)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, *[part for part in env.get("PATH", "").split(os.pathsep) if part]])
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "FLWR_HOME": str(Path(flwr_home).resolve()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def flower_script(name: str) -> str:
    """The path of a Flower console script (``flwr``, ``flower-superlink``, ``flower-supernode``) of this installation."""
    return str(Path(sys.executable).parent / name)
