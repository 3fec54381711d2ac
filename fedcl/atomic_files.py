"""Crash-safe writes: a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def write_bytes_atomic(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that a crash leaves either the old or the new file, never half of one.

    Temporary file in the same folder, fsync, ``os.replace``, then fsync of the
    folder so that the rename itself is durable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON atomically."""
    write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=True).encode("utf-8"))


def save_arrays_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save named arrays as .npz atomically."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())
