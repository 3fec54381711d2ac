"""Everything one site needs for a message: the parsed run config, its own records and the model.

The site reads its own files (``client/site_data.py``), numbers their labels
by the federation's public label set and tokenises them once per process (in
a simulation one worker serves several virtual sites; in a deployment each
message starts a fresh process, so this is rebuilt each time).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import torch
from flwr.common.logger import log

from client.device import site_device
from client.local_training import Encoded, count_longer, encode
from client.site_data import SiteFiles, SiteRecords, load_site_records, site_files
from fedcl.model_factory import AdapterModel, load_adapter_model
from fedcl.run_config import ConfigError, RunConfig, parse_run_config
from fedcl.worker_cache import WORKER_CACHE


@dataclass(frozen=True)
class SiteData:
    """One site's tokenised train and test records, and each record's stream key (label or group name)."""

    name: str
    index: int
    train: Encoded
    test: Encoded
    label_names: list[str]
    train_keys: list[str]
    test_keys: list[str]
    # which record attribute the keys are values of: "label", or "group:<column>" (the ledger's partition name, so
    # group values read from two different columns are never mistaken for one partition)
    stream_partition: str = "label"
    # the site-local notices already logged for these records in this process (say each once; never sent)
    notes_said: set[str] = field(default_factory=set, compare=False, repr=False)

    def note_once(self, message: str) -> None:
        """Log ``message`` at WARNING in the site's own log the first time this process holds these records."""
        if message not in self.notes_said:
            self.notes_said.add(message)
            log(WARNING, message)


@dataclass(frozen=True)
class SiteRuntime:
    """The parsed config, this site's data, the shared adapter model and the device it computes on."""

    config: RunConfig
    data: SiteData
    adapter: AdapterModel
    device: torch.device


def stream_keys(records: SiteRecords, config: RunConfig) -> list[str]:
    """Each record's key in the experience plan: its group value (stream-by group) or its label name."""
    if records.groups is not None:
        return list(records.groups)
    return [config.label_names[label] for label in records.labels.tolist()]


def truncation_note(site: str, max_length: int, train: tuple[int, int], test: tuple[int, int]) -> str:
    """The site-local line saying how many texts ``max_length`` cuts; "" when none is cut.

    ``train`` and ``test`` are ``(texts cut, texts)`` of each split. The
    counts depend on the site's records: the line goes to the site's own log
    only (the simulation launcher shows its ``fedcl:`` lines), never into a
    reply. Raises ValueError for a count outside ``0 .. texts``.
    """
    for cut, total in (train, test):
        if not 0 <= cut <= total:
            raise ValueError(f"{cut} of {total} texts cut: pass (texts cut, texts) with 0 <= cut <= texts")
    parts = [f"{cut} of {total} {what} texts" for (cut, total), what in ((train, "training"), (test, "test")) if cut]
    if not parts:
        return ""
    verbs = ("is", "was") if train[0] + test[0] == 1 else ("are", "were")
    return (
        f"fedcl: {site}: {' and '.join(parts)} {verbs[0]} longer than max-length {max_length} tokens and {verbs[1]} "
        "cut to it (raise max-length to keep more; longer is slower)"
    )


def site_data(config: RunConfig, files: SiteFiles, tokenizer: Any) -> SiteData:
    """This site's records, checked against the public label set and tokenised (cached per process).

    Raises :class:`client.site_data.SiteDataError` for records that do not fit.
    """
    stat = [
        (p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (files.data_path, files.test_path) if p and p.exists()
    ]
    key = (
        files,
        tuple(stat),
        config.labels,
        config.groups,
        config.stream,
        config.stream_by,
        config.model,
        config.max_length,
    )

    def tokenise() -> SiteData:
        train, test = load_site_records(files, config)
        note = truncation_note(
            files.site_name,
            config.max_length,
            (count_longer(tokenizer, train.texts, config.max_length), len(train.texts)),
            (count_longer(tokenizer, test.texts, config.max_length), len(test.texts)),
        )
        if note:  # where the records are tokenised (once per process while cached): the site's own log, never a reply
            log(WARNING, note)
        return SiteData(
            name=files.site_name,
            index=files.index,
            train=encode(tokenizer, train.texts, train.labels, config.max_length),
            test=encode(tokenizer, test.texts, test.labels, config.max_length),
            label_names=list(config.label_names),
            train_keys=stream_keys(train, config),
            test_keys=stream_keys(test, config),
            stream_partition="label" if train.groups is None else f"group:{files.group_column}",
        )

    return WORKER_CACHE.get_or_build("site-data", key, tokenise)


def site_runtime(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> SiteRuntime:
    """Assemble the runtime for one message from Flower's run and node configs.

    Raises :class:`ConfigError` when the run config declares no label set or
    the node config does not name the site's files.
    """
    config = parse_run_config(run_config)
    if len(config.label_names) < 2:
        raise ConfigError(
            f"config key 'labels' = {config.labels!r}: the federation's label set is public and declared once in "
            'the run config; run with labels="a,b,c" (the simulation launcher fills it in from the dataset)'
        )
    files = site_files(node_config, config, environ)
    if config.site_offsets and "partition-id" not in node_config:
        raise ConfigError(
            f"config key 'site-offsets' = {config.site_offsets!r} gives offsets by site number: start this "
            "SuperNode with partition-id=<its number> in its --node-config, or leave site-offsets empty"
        )
    device = site_device(node_config)
    WORKER_CACHE.set_budget(config.worker_cache_mb)  # what this worker keeps between messages (fedcl/worker_cache.py)
    adapter = load_adapter_model(config, num_labels=len(config.label_names), device=device)
    return SiteRuntime(config, site_data(config, files, adapter.tokenizer), adapter, device)
