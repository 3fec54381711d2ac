"""The server's checkpoint: everything a resumed run needs, written atomically after every round.

``<run-dir>/checkpoint/`` holds, after round ``k``:

- ``global.npz``: the global arrays (the adapter, or the class sums), for
  whoever wants the latest model;
- ``strategy_state.npz``: the aggregator's own state when it has one
  (FedAdam/FedYogi moments, ``exact``'s carried residual);
- ``resume.npz``: ONE file with all a resume reads, so that a crash leaves
  either round ``k - 1``'s or round ``k``'s, never a mixture: the global
  arrays (``global/<name>``), the aggregator state (``strategy/<name>``) and
  a JSON document (``state.json``) with the round, the run's total rounds,
  the server's memory (failed-round streak, ledger watch, privacy entries,
  site bindings, the continual accuracy counts) and the run config's
  training-relevant keys with their SHA-256.

``resume = "<run-dir>"`` continues a run from its ``resume.npz``; only the
keys in :data:`RESUME_FREE_KEYS` may differ from the checkpoint's.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcl.atomic_files import save_arrays_atomic, write_bytes_atomic
from fedcl.run_config import ConfigError, RunConfig
from server.strategy_setup import STATE_FILE

CHECKPOINT_DIR = "checkpoint"
GLOBAL_FILE = "global.npz"
RESUME_FILE = "resume.npz"
FORMAT_VERSION = 1
# Operational keys: where and how patiently the run goes on, not what it trains.
RESUME_FREE_KEYS = frozenset(
    {
        "resume",
        "output-dir",
        "round-timeout",
        "min-replies",
        "max-failed-rounds",
        "tensorboard",
        "worker-cache-mb",
        "eval-fraction",
    }
)
_GLOBAL, _STRATEGY, _STATE = "global/", "strategy/", "state.json"

Arrays = dict[str, np.ndarray]


def training_config(config: RunConfig) -> dict[str, Any]:
    """The run config's training-relevant keys (every key but :data:`RESUME_FREE_KEYS`), flat and kebab-case."""
    return {key: value for key, value in sorted(config.to_flat().items()) if key not in RESUME_FREE_KEYS}


def config_digest(relevant: dict[str, Any]) -> str:
    """SHA-256 of the training-relevant keys (canonical JSON)."""
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass
class Checkpoint:
    """One round's checkpoint (see the module docstring)."""

    round: int  # the last round done
    total_rounds: int  # the run's last round
    arrays: Arrays  # the committed global model
    strategy_state: Arrays  # the aggregator's state
    server: dict[str, Any] = field(default_factory=dict)  # JSON: streak, ledger watch, privacy, bindings, continual
    config: dict[str, Any] = field(default_factory=dict)  # training-relevant config keys
    config_sha256: str = ""

    @property
    def finished(self) -> bool:
        """True when every round of the run has been done."""
        return self.round >= self.total_rounds


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``global.npz``, ``strategy_state.npz`` (if the aggregator has state) and ``resume.npz``, each atomically.

    Returns the path of ``resume.npz``, the file a resume reads.
    """
    folder = run_dir / CHECKPOINT_DIR
    save_arrays_atomic(folder / GLOBAL_FILE, checkpoint.arrays)
    if checkpoint.strategy_state:
        save_arrays_atomic(folder / STATE_FILE, checkpoint.strategy_state)
    document = {
        "version": FORMAT_VERSION,
        "round": checkpoint.round,
        "total_rounds": checkpoint.total_rounds,
        "server": checkpoint.server,
        "config": checkpoint.config,
        "config_sha256": checkpoint.config_sha256 or config_digest(checkpoint.config),
    }
    payload: dict[str, np.ndarray] = {
        _STATE: np.frombuffer(json.dumps(document, sort_keys=True).encode("utf-8"), dtype=np.uint8),
        **{_GLOBAL + name: np.asarray(value) for name, value in checkpoint.arrays.items()},
        **{_STRATEGY + name: np.asarray(value) for name, value in checkpoint.strategy_state.items()},
    }
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    path = folder / RESUME_FILE
    write_bytes_atomic(path, buffer.getvalue())
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read ``<run_dir>/checkpoint/resume.npz``; raises ConfigError (one line, with the fix) if it is absent or unreadable."""
    path = run_dir / CHECKPOINT_DIR / RESUME_FILE
    if not path.is_file():
        raise ConfigError(
            f"config key 'resume' = '{run_dir}': no checkpoint at {path}; name a run directory whose server "
            "finished at least one round (it holds checkpoint/resume.npz), or leave resume empty for a fresh run"
        )
    try:
        with np.load(path, allow_pickle=False) as stored:
            document = json.loads(bytes(stored[_STATE]).decode("utf-8"))
            arrays = {k[len(_GLOBAL) :]: stored[k] for k in stored.files if k.startswith(_GLOBAL)}
            state = {k[len(_STRATEGY) :]: stored[k] for k in stored.files if k.startswith(_STRATEGY)}
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"config key 'resume' = '{run_dir}': cannot read {path} ({err}); it was not written by this server"
        ) from None
    if document.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"config key 'resume' = '{run_dir}': checkpoint format {document.get('version')!r}, this server reads "
            f"{FORMAT_VERSION}; resume it with the version of fedcl that wrote it"
        )
    return Checkpoint(
        round=int(document["round"]),
        total_rounds=int(document["total_rounds"]),
        arrays=arrays,
        strategy_state=state,
        server=dict(document.get("server", {})),
        config=dict(document.get("config", {})),
        config_sha256=str(document.get("config_sha256", "")),
    )


def check_same_training(config: RunConfig, checkpoint: Checkpoint, run_dir: Path) -> None:
    """Refuse (ConfigError, one line) a resume whose training-relevant keys differ from the checkpoint's, naming them."""
    now = training_config(config)
    if config_digest(now) == checkpoint.config_sha256:
        return
    missing = object()
    differing = sorted(
        key for key in set(now) | set(checkpoint.config) if now.get(key, missing) != checkpoint.config.get(key, missing)
    )
    details = ", ".join(
        f"{key} (checkpoint {checkpoint.config.get(key, '<absent>')!r}, now {now.get(key, '<absent>')!r})"
        for key in differing
    )
    raise ConfigError(
        f"config key 'resume' = '{run_dir}': the run was trained with other settings: {details or 'the digest differs'}; "
        f"resume with the same settings (only {', '.join(sorted(RESUME_FREE_KEYS))} may change)"
    )


def open_resume(config: RunConfig, run_dir: Path) -> Checkpoint:
    """The checkpoint ``resume`` names, checked against ``config`` (ConfigError, one line, if it does not fit)."""
    checkpoint = load_checkpoint(run_dir)
    check_same_training(config, checkpoint, run_dir)
    return checkpoint
