"""The partitioning source: one dataset split into virtual sites, each handed its own files.

A real site reads the files its node config names (``client/site_data.py``).
A simulation has one dataset; the launcher, as the operator of every virtual
site, splits it (``simulations/scenarios.py``), writes site ``i``'s share to
``<data-root>/site-<i>/train.csv`` and ``test.csv`` (columns ``text``,
``label``, ``group``), and declares what the federation agrees on in public:
the label set (``labels``), the group values (``groups``) and an experience
plan written in public names. The virtual sites then read their files through
exactly the code a hospital's site runs.

The files hold record text: they live in the run directory, beside the sites'
state, and are deleted with it.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcl.run_config import ConfigError, RunConfig
from simulations.data_sources import LabelledTexts, load_dataset
from simulations.scenarios import SiteSplit, split_sites

COLUMNS = {"text-column": "text", "label-column": "label", "group-column": "group"}


@dataclass(frozen=True)
class VirtualSites:
    """The dataset, its split into sites, and the public run-config keys the launcher declares."""

    data: LabelledTexts
    sites: list[SiteSplit]
    public: dict[str, Any]  # labels, groups, and a stream plan in label names where the data decided it


def public_keys(config: RunConfig, data: LabelledTexts) -> dict[str, Any]:
    """The run-config keys the federation declares from this dataset: ``labels``, ``groups``, the stream plan.

    An explicit ``labels`` is kept (its order numbers the classes) if it
    covers the dataset's labels; class-incremental experiences by group are
    written as label sets (``stream-by = label``, ``stream-groups``), because
    only the data knows which labels a group holds. Raises
    :class:`ConfigError` for a dataset label missing from explicit ``labels``,
    or a name with a comma (the lists are comma-separated).
    """
    from simulations.streams import label_plan, plan_experiences

    names = config.label_names or list(data.label_names)
    missing = sorted(set(data.label_names) - set(names))
    if missing:
        raise ConfigError(
            f"config key 'labels' = {config.labels!r}: the dataset also holds {missing[:5]}; add them, or leave "
            "labels empty to take the dataset's"
        )
    groups = sorted(set(data.groups)) if data.groups is not None else []
    for what, values in (("label", names), ("group value", groups)):
        if any("," in value or ";" in value for value in values):
            bad = next(value for value in values if "," in value or ";" in value)
            raise ConfigError(f"the dataset's {what} {bad!r} contains ',' or ';': rename it in the data file")
    keys: dict[str, Any] = {"labels": ",".join(names), "groups": config.groups or ",".join(groups)}
    if config.stream == "class-incremental" and config.stream_by == "group":
        plan = label_plan(
            plan_experiences(
                data, config.stream, config.stream_by, config.num_experiences, config.stream_groups, config.seed
            ),
            data,
        )
        keys.update(
            {"stream-by": "label", "stream-groups": ";".join(",".join(m) for m in plan.members), "num-experiences": 0}
        )
    return keys


def virtual_sites(config: RunConfig) -> VirtualSites:
    """Load the dataset and split it into ``num-sites`` virtual sites; raises ConfigError for user errors."""
    data = load_dataset(config)
    if len(data.label_names) < 2:
        raise ConfigError(
            f"config key 'label-column' = {config.label_column!r}: only one label value; a classifier needs two or more"
        )
    sites = split_sites(data.labels, data.groups, config)
    keys = public_keys(config, data)
    # the virtual sites' sizes are declared public (README, "Adjacency and the site's size"): their mean is the
    # typical site size the default recipe reads, unless the run config declares one
    keys["records-per-site"] = config.records_per_site or round(sum(len(s.train) for s in sites) / len(sites))
    return VirtualSites(data, sites, keys)


def write_site_files(sites: VirtualSites, data_root: Path) -> list[Path]:
    """Write every virtual site's train.csv and test.csv under ``data_root/site-<i>/`` (folders 0700, files 0600)."""
    folders = []
    data_root.mkdir(parents=True, exist_ok=True)
    data_root.chmod(0o700)  # the records' text: readable by the launcher's user only, as a real site would keep it
    for index, split in enumerate(sites.sites):
        folder = data_root / f"site-{index}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, rows in (("train.csv", split.train), ("test.csv", split.test)):
            write_records(folder / name, sites.data, rows)
        folders.append(folder)
    return folders


def write_records(path: Path, data: LabelledTexts, rows: Any) -> None:
    """Write the given dataset rows as a CSV with columns text, label, group (atomically, mode 0600)."""
    partial = path.with_suffix(".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # record text: owner only
    with open(descriptor, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([COLUMNS["text-column"], COLUMNS["label-column"], COLUMNS["group-column"]])
        for i in rows:
            writer.writerow([data.texts[i], data.label_names[data.labels[i]], data.groups[i] if data.groups else ""])
    os.replace(partial, path)


def virtual_node_config(data_root: Path, index: int) -> dict[str, Any]:
    """The node config a virtual site would be started with: its number, name, files and columns."""
    folder = data_root / f"site-{index}"
    return {
        "partition-id": index,
        "site-name": f"site-{index}",
        "data-path": str(folder / "train.csv"),
        "test-path": str(folder / "test.csv"),
        **COLUMNS,
    }
