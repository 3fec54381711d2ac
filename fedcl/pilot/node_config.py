"""A site's node config (``--node-config``), checked before its SuperNode starts.

The node config names the site's own files and policy (``client/site_policy.py``
reads the policy, the site's data loader the files). Before a SuperNode is
started this module checks what would otherwise fail only at the first round,
on the site, in a log nobody is watching: that ``site-name``, ``data-path`` and
``state-dir`` are there, that the data (and test) file exists, and it makes the
paths absolute (the app processes do not run in the folder the operator typed
the command in).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcl.pilot.errors import PilotError
from fedcl.pilot.pki import check_site_name

REQUIRED_KEYS = ("site-name", "data-path", "state-dir")
PATH_KEYS = ("data-path", "test-path", "state-dir")
DATA_SUFFIXES = (".csv", ".jsonl")
EXAMPLE = "--node-config \"site-name='hospital-a' data-path='/data/fedcl/train.csv' state-dir='/var/lib/fedcl/state'\""


@dataclass(frozen=True)
class SiteNodeConfig:
    """A checked node config: the site's name, its data file, its state folder, and every key as given."""

    site_name: str
    data_path: Path
    state_dir: Path
    values: dict[str, Any]

    def to_argument(self) -> str:
        """The node config as ``flower-supernode --node-config`` takes it (paths absolute)."""
        return format_config(self.values)


def parse_node_config(text: str) -> dict[str, Any]:
    """Parse ``key=value`` pairs as Flower does (TOML values: quote strings); :class:`PilotError` with an example."""
    from flwr.common.config import parse_config_args  # Flower's own parser: the SuperNode reads the string with it

    try:
        values = dict(parse_config_args([text])) if text.strip() else {}
    except Exception as err:  # Flower raises click's exception type with a generic message
        raise PilotError(
            f"--node-config {text!r} cannot be read: write key=value pairs separated by spaces and quote text "
            f"values, e.g. {EXAMPLE}"
        ) from err
    return values


def format_value(key: str, value: Any) -> str:
    """One config value as TOML Flower's parser reads back (strings single- or double-quoted, no escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise PilotError(f"config '{key}' = {text!r}: a value cannot hold both quote characters; rename the path")


def format_config(values: dict[str, Any]) -> str:
    """The ``key=value`` string for ``values`` as Flower parses node and run configs (inverse of :func:`parse_node_config`)."""
    return " ".join(f"{key}={format_value(key, value)}" for key, value in values.items())


def check_node_config(text: str, base: Path | None = None) -> SiteNodeConfig:
    """Parse and check a site's node config; return it with its paths made absolute (relative to ``base``).

    Raises :class:`PilotError` (one line, with the fix) if ``site-name``,
    ``data-path`` or ``state-dir`` is missing or empty, the site name is not a
    usable name, the data or test file does not exist or is not ``.csv`` /
    ``.jsonl``, or the state directory is a file.
    """
    values = parse_node_config(text)
    missing = [key for key in REQUIRED_KEYS if not str(values.get(key, "")).strip()]
    if missing:
        raise PilotError(
            f"node config is missing {', '.join(repr(key) for key in missing)}: a site names itself, its data file "
            f"and the folder where it keeps its privacy ledger, e.g. {EXAMPLE}"
        )
    base = Path.cwd() if base is None else base
    for key in PATH_KEYS:
        if str(values.get(key, "")).strip():
            values[key] = str((base / Path(str(values[key])).expanduser()).resolve())
    site_name = check_site_name(str(values["site-name"]))
    for key in ("data-path", "test-path"):
        if key not in values:
            continue
        path = Path(values[key])
        if not path.is_file():
            raise PilotError(
                f"node config '{key}' = {str(path)!r}: no such file on this machine; give the path of the site's "
                f"{'training' if key == 'data-path' else 'test'} data (a .csv or .jsonl file with a text and a label column)"
            )
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise PilotError(f"node config '{key}' = {str(path)!r}: use a .csv or .jsonl file")
    state_dir = Path(values["state-dir"])
    if state_dir.exists() and not state_dir.is_dir():
        raise PilotError(
            f"node config 'state-dir' = {str(state_dir)!r} is a file; name a folder the site keeps and backs up"
        )
    return SiteNodeConfig(site_name, Path(values["data-path"]), state_dir, values)
