"""Durable per-site state files: named numpy arrays plus string metadata, written atomically.

One file per piece of state (replay buffer, EWC importances). The format is
safetensors (no pickle, so loading a file cannot run code) with a JSON-able
``__metadata__`` of strings. A write goes to a temporary file in the same
folder, is fsynced, replaces the old file with ``os.replace`` and then the
folder is fsynced, so a crash leaves either the old or the new file, never a
torn one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from fedcl.atomic_files import write_bytes_atomic


class StateFileError(ValueError):
    """A state file that cannot be read back (truncated, foreign or from other settings)."""


write_atomic = write_bytes_atomic  # one implementation of crash-safe writes, shared with the server


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Save named arrays and string metadata to ``path`` (safetensors), atomically."""
    from safetensors.numpy import save

    contiguous = {name: np.ascontiguousarray(value) for name, value in arrays.items()}
    write_atomic(path, save(contiguous, metadata=dict(metadata)))


def load_arrays(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read back what :func:`save_arrays` wrote: ``(arrays, metadata)``.

    Raises :class:`StateFileError` if the file is not a readable safetensors file.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError type for a bad header
        raise StateFileError(
            f"state file {path} is unreadable ({err}); delete it to start this piece of state afresh"
        ) from err
    return arrays, metadata
