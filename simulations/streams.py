"""Streams: split every site's data into the same sequence of experiences.

Two steps, so that the rest of the system never touches Avalanche:

1. :func:`plan_experiences` decides, once for the whole federation, what each
   experience holds: a tuple of label names (``stream-by = label``) or of
   group-column values (``stream-by = group``) per experience. The plan is
   global (computed from the whole dataset, not from one site's share), so
   experience ``e`` means the same thing at every site even when a site lacks
   some labels. It is small and serialisable (:meth:`ExperiencePlan.to_dict`):
   the server can compute it once and send it.
2. :func:`site_streams` turns a plan and the sites' splits into plain index
   arrays per experience per site.

Kinds (run-config key ``stream``):

- ``none``: one experience holding everything (plain federated training and
  the joint upper bound).
- ``class-incremental``: disjoint label sets per experience. The label sets
  come from explicit groups (``stream-groups = "a,b;c,d;e"``), from a seeded
  split of all labels into ``num-experiences`` groups, or (``stream-by =
  group``) from the group column: every label goes with the group its examples
  belong to (CLINC150: its domain), and the groups are the units that are
  ordered and dealt to experiences.
- ``domain-incremental``: experiences are values of the group column
  (``stream-by = group``), so the inputs shift while the label set may stay the
  same.

A seeded split (no explicit groups) is Avalanche's
``class_incremental_benchmark`` applied to the units (labels or group values),
with ``num_classes_per_exp`` sizes that differ by at most one (Avalanche's
``num_experiences`` mode would silently drop the remainder units): for a given
seed, the order is the class order Avalanche itself draws, so a stream here
matches an Avalanche benchmark built with the same seed. Explicit groups keep
their order.

An experience may be empty at a site (label skew, or a domain a site does not
hold): that is an empty index array, never an error; the round loop decides
to skip it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcl.run_config import ConfigError
from simulations.data_sources import LabelledTexts
from simulations.scenarios import SiteSplit

STREAM_KINDS = ("none", "class-incremental", "domain-incremental")
STREAM_UNITS = ("label", "group")
_SHOWN_NAMES = 20  # how many known names an error message lists


@dataclass(frozen=True)
class ExperiencePlan:
    """What every experience holds, the same at every site.

    ``members[e]`` are the label names (``unit == "label"``) or group-column
    values (``unit == "group"``) of experience ``e``; they are disjoint and
    together cover every label (or every group value) of the dataset.
    """

    kind: str
    unit: str
    members: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.members)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (to persist the plan or send it in a config record)."""
        return {"kind": self.kind, "unit": self.unit, "members": [list(m) for m in self.members]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperiencePlan:
        """Inverse of :meth:`to_dict`."""
        return cls(str(raw["kind"]), str(raw["unit"]), tuple(tuple(str(n) for n in m) for m in raw["members"]))


@dataclass(frozen=True)
class SiteExperience:
    """One experience at one site: positions into the site's train and test splits.

    Positions are row numbers of ``SiteSplit.train`` / ``SiteSplit.test`` (the
    rows of the site's encoded tensors); ``split.train[experience.train]`` gives
    dataset indices.
    """

    index: int
    train: np.ndarray
    test: np.ndarray

    @property
    def is_empty(self) -> bool:
        """True when the site has no training example in this experience (skip it)."""
        return len(self.train) == 0


@dataclass(frozen=True)
class SiteStream:
    """A site's sequence of experiences (same length and meaning at every site)."""

    site: str
    experiences: tuple[SiteExperience, ...]

    def __len__(self) -> int:
        return len(self.experiences)

    def empty_experiences(self) -> list[int]:
        """Indices of the experiences in which this site has nothing to train on."""
        return [e.index for e in self.experiences if e.is_empty]


def parse_groups(spec: str, key: str = "stream-groups") -> list[list[str]]:
    """Parse ``"a,b;c,d;e"`` into ``[["a", "b"], ["c", "d"], ["e"]]`` (names stripped).

    Raises :class:`ConfigError` for an empty group or an empty name.
    """
    groups = []
    for number, part in enumerate(spec.split(";"), start=1):
        names = [name.strip() for name in part.split(",")]
        if not part.strip() or any(not name for name in names):
            _fail(key, spec, f'group {number} is empty or has an empty name; write groups like "a,b;c,d;e"')
        groups.append(names)
    return groups


def plan_experiences(
    data: LabelledTexts,
    kind: str,
    unit: str = "label",
    num_experiences: int = 0,
    groups: str = "",
    seed: int = 0,
) -> ExperiencePlan:
    """Decide what each experience holds (see the module docstring).

    ``num_experiences = 0`` means one experience per explicit group, or per
    group value with ``unit = "group"``. Raises :class:`ConfigError` (a
    ``ValueError``) for unknown names, a name in two groups, names left out of
    every group, more experiences than units, or a group column that the kind
    needs but the dataset lacks.
    """
    if kind not in STREAM_KINDS:
        _fail("stream", kind, f"use one of {', '.join(STREAM_KINDS)}")
    if unit not in STREAM_UNITS:
        _fail("stream-by", unit, f"use one of {', '.join(STREAM_UNITS)}")
    if num_experiences < 0:
        _fail("num-experiences", num_experiences, "use 0 (derived from the groups) or a positive number")
    if kind == "none":
        if groups.strip() or num_experiences > 1:
            _fail(
                "stream",
                kind,
                "stream-groups and num-experiences need stream = class-incremental or domain-incremental",
            )
        return ExperiencePlan(kind, "label", (tuple(data.label_names),))
    if kind == "domain-incremental" and unit != "group":
        _fail("stream-by", unit, "domain-incremental experiences are values of the group column; set stream-by = group")
    if unit == "group":
        if data.groups is None:
            _fail("stream-by", unit, "the dataset has no group column; set group-column, or use stream-by = label")
        names = sorted(set(data.groups))
        if kind == "class-incremental":
            _check_labels_follow_groups(data)
    else:
        names = list(data.label_names)
    what = "label" if unit == "label" else "group value"
    if groups.strip():
        chosen = _checked_groups(parse_groups(groups), names, what)
        if num_experiences not in (0, len(chosen)):
            _fail(
                "num-experiences",
                num_experiences,
                f"stream-groups defines {len(chosen)} experiences; set num-experiences = 0 or {len(chosen)}",
            )
        return ExperiencePlan(kind, unit, tuple(tuple(g) for g in chosen))
    if num_experiences == 0:
        if unit == "label":
            _fail("num-experiences", 0, "with stream-by = label give num-experiences >= 1 or explicit stream-groups")
        num_experiences = len(names)
    if num_experiences > len(names):
        _fail(
            "num-experiences",
            num_experiences,
            f"only {len(names)} {what}s to split; use num-experiences <= {len(names)}",
        )
    parts = seeded_partition(len(names), num_experiences, seed)
    return ExperiencePlan(kind, unit, tuple(tuple(names[i] for i in part) for part in parts))


def seeded_partition(count: int, parts: int, seed: int) -> list[list[int]]:
    """Split items ``0..count-1`` into ``parts`` seeded groups with Avalanche's class-incremental generator.

    Each item is one class of a one-row dataset given to
    ``class_incremental_benchmark(..., num_classes_per_exp=sizes, seed=seed)``;
    sizes differ by at most one (the first ``count % parts`` groups get the
    extra item). Torch's global random state is restored afterwards (Avalanche
    reseeds it). Items inside a group are sorted.
    """
    if not 1 <= parts <= count:
        raise ValueError(f"cannot split {count} items into {parts} non-empty groups; use 1 <= parts <= {count}")
    import torch
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.benchmarks.utils.data_attribute import DataAttribute
    from torch.utils.data import TensorDataset

    sizes = [count // parts + (1 if i < count % parts else 0) for i in range(parts)]
    items = torch.arange(count)
    dataset = AvalancheDataset(
        [TensorDataset(items, items)], data_attributes=[DataAttribute(items.tolist(), "targets")]
    )
    with torch.random.fork_rng(devices=[]):
        benchmark = class_incremental_benchmark({"train": dataset}, num_classes_per_exp=sizes, seed=seed)
    return [sorted(int(c) for c in exp.dataset.targets.uniques) for exp in benchmark.train_stream]


def experience_of_examples(plan: ExperiencePlan, data: LabelledTexts) -> np.ndarray:
    """For every example of the dataset, the index of its experience (int64 array)."""
    position = {name: e for e, members in enumerate(plan.members) for name in members}
    if plan.unit == "group":
        if data.groups is None:
            raise ValueError("the plan splits by group column but the dataset has none; load it with its group-column")
        keys: Sequence[str] = data.groups
    else:
        keys = [data.label_names[label] for label in data.labels]
    missing = sorted({k for k in keys if k not in position})
    if missing:
        raise ValueError(f"the plan does not place {missing[:5]}; build the plan from this same dataset")
    return np.fromiter((position[k] for k in keys), dtype=np.int64, count=len(keys))


def experience_labels(plan: ExperiencePlan, data: LabelledTexts) -> list[np.ndarray]:
    """Per experience, the sorted label ids it holds across the whole dataset (public: from the plan)."""
    owner = experience_of_examples(plan, data)
    return [np.unique(data.labels[owner == e]) for e in range(len(plan))]


def site_streams(plan: ExperiencePlan, data: LabelledTexts, sites: Sequence[SiteSplit]) -> list[SiteStream]:
    """Every site's experiences as positions into its own train and test splits."""
    owner = experience_of_examples(plan, data)
    streams = []
    for split in sites:
        train_owner, test_owner = owner[split.train], owner[split.test]
        experiences = tuple(
            SiteExperience(e, np.flatnonzero(train_owner == e), np.flatnonzero(test_owner == e))
            for e in range(len(plan))
        )
        streams.append(SiteStream(split.name, experiences))
    return streams


def _checked_groups(groups: list[list[str]], known: list[str], what: str) -> list[list[str]]:
    known_set = set(known)
    seen: dict[str, int] = {}
    for number, group in enumerate(groups, start=1):
        unknown = [name for name in group if name not in known_set]
        if unknown:
            shown = ", ".join(known[:_SHOWN_NAMES]) + (" ..." if len(known) > _SHOWN_NAMES else "")
            _fail(
                "stream-groups",
                ";".join(",".join(g) for g in groups),
                f"group {number} names unknown {what}s {unknown}; known {what}s: {shown}",
            )
        for name in group:
            if name in seen:
                _fail(
                    "stream-groups",
                    ";".join(",".join(g) for g in groups),
                    f"{what} {name!r} is in group {seen[name]} and group {number}; put it in exactly one group",
                )
            seen[name] = number
    left_out = [name for name in known if name not in seen]
    if left_out:
        _fail(
            "stream-groups",
            ";".join(",".join(g) for g in groups),
            f"{what}s {left_out[:_SHOWN_NAMES]} are in no group; add each to one group",
        )
    return groups


def _check_labels_follow_groups(data: LabelledTexts) -> None:
    if data.groups is None:
        return
    groups_of: dict[int, set[str]] = defaultdict(set)
    for label, group in zip(data.labels.tolist(), data.groups):
        groups_of[label].add(group)
    split = {data.label_names[label]: sorted(g) for label, g in groups_of.items() if len(g) > 1}
    if split:
        name, where = next(iter(split.items()))
        _fail(
            "stream-by",
            "group",
            f"label {name!r} occurs in groups {where} ({len(split)} such labels), so groups do not split the labels; "
            "use stream = domain-incremental, or stream-by = label",
        )


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: {fix}")
