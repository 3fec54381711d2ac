"""Writing key and certificate files: never over an existing file unless asked, private keys readable by the owner only."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedcl.pilot.errors import PilotError

PRIVATE_MODE = 0o600  # a private key: the owner reads and writes it, nobody else
PUBLIC_MODE = 0o644  # a certificate or public key: meant to be handed out
FOLDER_MODE = 0o700  # a new folder that will hold private keys


def refuse_existing(paths: Iterable[Path], force: bool) -> None:
    """Raise :class:`PilotError` naming ``--force`` if any of ``paths`` exists and ``force`` is false.

    Called before anything is written, so that a refused command leaves no
    half-made set of files behind.
    """
    if force:
        return
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:
        raise PilotError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; nothing was written. "
            "Keep the files you have, or pass --force to replace them (a replaced key must be handed out again)"
        )


def make_private_folder(folder: Path) -> Path:
    """Create ``folder`` (and its parents) with mode 0700 if it does not exist; an existing folder is left as it is."""
    if not folder.exists():
        folder.mkdir(parents=True, mode=FOLDER_MODE)
        os.chmod(folder, FOLDER_MODE)  # mkdir's mode is reduced by the umask; this one is meant
    elif not folder.is_dir():
        raise PilotError(f"{folder} is a file, not a folder; name a folder for the keys and certificates")
    return folder


def write_file(path: Path, payload: bytes, mode: int, force: bool) -> Path:
    """Write ``payload`` to ``path`` with exactly ``mode``, atomically.

    The bytes go to a temporary file created with ``mode`` (0600 for a private
    key: no moment at which another user can read it), then take the target's
    name: with ``force`` by replacing it, without by a hard link that fails if
    the name exists (so a file created meanwhile is never overwritten).
    """
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as err:
                raise PilotError(f"{path} already exists; nothing was written. Pass --force to replace it") from err
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_files(files: Mapping[Path, tuple[bytes, int]], force: bool) -> list[Path]:
    """Write a set of files (path -> (bytes, mode)) after checking that none exists (unless ``force``)."""
    refuse_existing(files, force)
    return [write_file(path, payload, mode, force) for path, (payload, mode) in files.items()]
