"""A site's own records: the files its node config names, checked against the federation's public label set.

Node config keys (the site's operator sets them when starting its SuperNode):

- ``site-name``: the name the site answers with (required outside a simulation).
- ``data-path``: a ``.csv`` (header row) or ``.jsonl`` file of the site's records.
- ``test-path``: optional held-out records in the same format; without it,
  ``test-fraction`` (default 0.2) of ``data-path`` is held out by a seeded
  shuffle (``split-seed``, default 0: the site's split never depends on the
  run config, so a server cannot turn training records into test records).
- ``text-column`` / ``label-column`` / ``group-column``: column names
  (defaults: the run config's ``text-column``, ``label-column``,
  ``group-column``).

Labels are numbered by their position in the run config's ``labels`` (public,
declared once for the federation), never by what a file holds: a site that
lacks a label is fine; a record whose label is not in the set is refused with
one line naming the label, the file and the fix (:class:`SiteDataError`), and
nothing is trained or spent. With ``stream-by = group`` the group column is
needed and its values must be in the run config's ``groups``.

In a simulation the launcher is the operator of every virtual site: it writes
each site's share of one dataset to ``<data-root>/site-<partition-id>/``
(``train.csv``, ``test.csv``) and names that root in the environment
(``FEDCL_SIMULATION_SITES``, ``client/site_policy.py``); the site reads its
files exactly as a real site does.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.site_policy import simulation_settings
from fedcl.run_config import ConfigError, RunConfig

SUFFIXES = (".csv", ".jsonl")


class SiteDataError(ConfigError):
    """A site's files do not fit the federation (a label outside the set, a missing column, an empty file)."""


@dataclass(frozen=True)
class SiteFiles:
    """Where a site's records are and how to read them (from its node config)."""

    site_name: str
    index: int  # partition-id when given (site-offsets and seeded simulation noise use it), else 0
    data_path: Path
    test_path: Path | None
    test_fraction: float
    split_seed: int
    text_column: str
    label_column: str
    group_column: str


@dataclass(frozen=True)
class SiteRecords:
    """Records of one split: texts, label ids into the public label set, group values (or None)."""

    texts: list[str]
    labels: np.ndarray
    groups: list[str] | None

    def __len__(self) -> int:
        return len(self.texts)


def site_files(
    node_config: Mapping[str, Any], config: RunConfig, environ: Mapping[str, str] | None = None
) -> SiteFiles:
    """The site's files from its node config (or, for a virtual site, from the launcher's data root).

    Raises :class:`ConfigError` naming the missing key and how to set it.
    """
    environ = os.environ if environ is None else environ
    simulation = simulation_settings(environ)
    index = int(node_config.get("partition-id", 0))
    data_path = str(node_config.get("data-path", "") or "")
    test_path = str(node_config.get("test-path", "") or "")
    name = str(node_config.get("site-name", "") or "")
    launcher_columns: Mapping[str, Any] = {}
    if not data_path and simulation.get("data-root") and "partition-id" in node_config:
        folder = Path(str(simulation["data-root"])) / f"site-{index}"
        data_path, test_path = str(folder / "train.csv"), str(folder / "test.csv")
        name = name or f"site-{index}"
        launcher_columns = simulation.get("columns", {}) if isinstance(simulation.get("columns"), dict) else {}
    if not data_path:
        raise ConfigError(
            "node config 'data-path' is missing: a site trains on its own records; start the SuperNode with "
            "--node-config \"data-path='/path/to/records.csv' site-name='hospital-a' state-dir='...'\""
        )
    if not name:
        raise ConfigError(
            "node config 'site-name' is missing: the name this site answers with; add site-name='hospital-a' "
            "to the SuperNode's --node-config"
        )
    try:
        fraction = float(node_config.get("test-fraction", 0.2))
        seed = int(node_config.get("split-seed", 0))
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"node config: {err}; use a number for test-fraction and a whole number for split-seed"
        ) from err
    if not test_path and not 0.0 < fraction < 1.0:
        raise ConfigError(f"node config 'test-fraction' = {fraction!r}: use a value strictly between 0 and 1, e.g. 0.2")
    return SiteFiles(
        site_name=name,
        index=index,
        data_path=Path(data_path).expanduser(),
        test_path=Path(test_path).expanduser() if test_path else None,
        test_fraction=fraction,
        split_seed=seed,
        text_column=str(node_config.get("text-column", launcher_columns.get("text-column", config.text_column))),
        label_column=str(node_config.get("label-column", launcher_columns.get("label-column", config.label_column))),
        group_column=str(node_config.get("group-column", launcher_columns.get("group-column", config.group_column))),
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``.csv`` (with a header) or ``.jsonl`` file; SiteDataError for a missing or unknown file."""
    if not path.is_file():
        raise SiteDataError(
            f"node config data file {str(path)!r} does not exist; point data-path/test-path at the site's file"
        )
    if path.suffix not in SUFFIXES:
        raise SiteDataError(f"{path}: unsupported file type {path.suffix!r}; use .csv (with a header row) or .jsonl")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            if path.suffix == ".csv":
                return list(csv.DictReader(handle))
            rows = []
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise SiteDataError(
                            f"{path}, line {number}: not JSON ({err.msg}); one JSON object per line"
                        ) from err
            return rows
    except UnicodeDecodeError as err:
        raise SiteDataError(
            f"{path}: byte {err.object[err.start]:#04x} at offset {err.start} is not UTF-8; save the file as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    except csv.Error as err:  # a field over the csv module's size limit, a NUL byte
        raise SiteDataError(f"{path}: not a readable CSV ({err}); check its quoting and line endings") from None


def records_of(path: Path, files: SiteFiles, label_names: list[str], group_names: list[str] | None) -> SiteRecords:
    """The file's records with labels numbered by the public label set.

    Raises :class:`SiteDataError` for an empty file, a missing column, a
    record with an empty text or label, a label outside ``label_names`` or a
    group value outside ``group_names`` (when groups are needed).
    """
    rows = read_rows(path)
    if not rows:
        raise SiteDataError(f"{path} has no records; point the node config at the site's records")
    columns = [files.text_column, files.label_column] + ([files.group_column] if group_names is not None else [])
    for column in columns:
        if column not in rows[0]:
            key = {files.text_column: "text-column", files.label_column: "label-column"}.get(column, "group-column")
            raise SiteDataError(
                f"{path} has no column {column!r} (node config '{key}'); its columns are "
                f"{', '.join(sorted(map(str, rows[0])))}; set {key} to one of them"
            )
    index = {name: i for i, name in enumerate(label_names)}
    known_groups = set(group_names or [])
    texts, labels, groups = [], [], []
    for number, row in enumerate(rows, start=2 if path.suffix == ".csv" else 1):
        text, label = str(row.get(files.text_column) or "").strip(), str(row.get(files.label_column) or "").strip()
        if not text or not label:
            raise SiteDataError(f"{path}, record {number}: empty text or label; fill it in or remove the record")
        if label not in index:
            raise SiteDataError(
                f"{path}, record {number}: label {label!r} is not in the federation's label set (run config "
                "'labels'); correct the record, or ask the coordinator to add the label to labels for every site"
            )
        texts.append(text)
        labels.append(index[label])
        if group_names is not None:
            group = str(row.get(files.group_column) or "").strip()
            if group not in known_groups:
                raise SiteDataError(
                    f"{path}, record {number}: group {group!r} is not in the federation's groups (run config "
                    "'groups'); correct the record, or ask the coordinator to add it to groups"
                )
            groups.append(group)
    return SiteRecords(texts, np.asarray(labels, dtype=np.int64), groups if group_names is not None else None)


def subset(records: SiteRecords, rows: np.ndarray) -> SiteRecords:
    """The given rows of ``records``, in that order."""
    return SiteRecords(
        [records.texts[i] for i in rows],
        records.labels[rows],
        [records.groups[i] for i in rows] if records.groups is not None else None,
    )


def load_site_records(files: SiteFiles, config: RunConfig) -> tuple[SiteRecords, SiteRecords]:
    """The site's train and test records (a seeded hold-out of ``test-fraction`` without a test file).

    Raises :class:`SiteDataError` as :func:`records_of`, or when the hold-out
    would leave no training or no test record.
    """
    groups = config.group_names if config.stream_by == "group" and config.stream != "none" else None
    train = records_of(files.data_path, files, config.label_names, groups)
    if files.test_path is not None:
        return train, records_of(files.test_path, files, config.label_names, groups)
    order = np.random.default_rng(files.split_seed).permutation(len(train))
    n_test = int(round(len(order) * files.test_fraction))
    if n_test == 0 or n_test == len(order):
        raise SiteDataError(
            f"{files.data_path}: {len(order)} records cannot be split into train and test at test-fraction "
            f"{files.test_fraction}; add records, change test-fraction, or give a test-path"
        )
    return subset(train, np.sort(order[n_test:])), subset(train, np.sort(order[:n_test]))


def files_digest(files: SiteFiles) -> str:
    """SHA-256 of the site's data files' bytes and of how they are read (a cache key, not a privacy check)."""
    digest = hashlib.sha256()
    for path in (files.data_path, files.test_path):
        if path is not None:
            digest.update(path.read_bytes())
        digest.update(b"\0")
    settings = (files.test_fraction, files.split_seed, files.text_column, files.label_column, files.group_column)
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()
