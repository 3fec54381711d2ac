"""Streams: split every site's data into the same sequence of experiences.

Two steps, so that the rest of the system never touches Avalanche:

1. :func:`plan_experiences` (``fedcl/experience_plan.py`` for the public part) decides, once for the whole federation, what each
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

import numpy as np

from fedcl.experience_plan import (
    STREAM_KINDS,
    STREAM_UNITS,
    ExperiencePlan,
    SiteExperience,
    SiteStream,
    fail,
    parse_groups,
    seeded_partition,
    site_stream,
)
from fedcl.experience_plan import plan_experiences as plan_from_names
from simulations.data_sources import LabelledTexts
from simulations.scenarios import SiteSplit

__all__ = [
    "STREAM_KINDS",
    "STREAM_UNITS",
    "ExperiencePlan",
    "SiteExperience",
    "SiteStream",
    "experience_labels",
    "experience_of_examples",
    "label_plan",
    "parse_groups",
    "plan_experiences",
    "seeded_partition",
    "site_streams",
]


def plan_experiences(
    data: LabelledTexts,
    kind: str,
    unit: str = "label",
    num_experiences: int = 0,
    groups: str = "",
    seed: int = 0,
) -> ExperiencePlan:
    """The plan of ``fedcl.experience_plan.plan_experiences`` for this dataset's label and group names.

    Also checks what only the data can tell: a group-based kind needs the
    dataset's group column, and class-incremental by group needs every label
    to occur in one group only. Raises :class:`ConfigError` otherwise.
    """
    if unit == "group" and kind != "none" and data.groups is None:
        fail("stream-by", unit, "the dataset has no group column; set group-column, or use stream-by = label")
    if unit == "group" and kind == "class-incremental":
        _check_labels_follow_groups(data)
    group_names = sorted(set(data.groups)) if data.groups is not None else None
    return plan_from_names(list(data.label_names), group_names, kind, unit, num_experiences, groups, seed)


def label_plan(plan: ExperiencePlan, data: LabelledTexts) -> ExperiencePlan:
    """The same experiences written as label sets (class-incremental by group: each group's labels).

    What the launcher hands a run: sites and server then need only public
    label names. Other plans are returned unchanged.
    """
    if plan.unit != "group" or plan.kind != "class-incremental":
        return plan
    held = experience_labels(plan, data)
    return ExperiencePlan(plan.kind, "label", tuple(tuple(data.label_names[i] for i in ids) for ids in held))


def experience_of_examples(plan: ExperiencePlan, data: LabelledTexts) -> np.ndarray:
    """For every example of the dataset, the index of its experience (int64 array)."""
    if plan.unit == "group":
        if data.groups is None:
            raise ValueError("the plan splits by group column but the dataset has none; load it with its group-column")
        keys: Sequence[str] = data.groups
    else:
        keys = [data.label_names[label] for label in data.labels]
    return plan.experience_of(list(keys))


def experience_labels(plan: ExperiencePlan, data: LabelledTexts) -> list[np.ndarray]:
    """Per experience, the sorted label ids its examples hold across the whole dataset."""
    owner = experience_of_examples(plan, data)
    return [np.unique(data.labels[owner == e]) for e in range(len(plan))]


def site_streams(plan: ExperiencePlan, data: LabelledTexts, sites: Sequence[SiteSplit]) -> list[SiteStream]:
    """Every site's experiences as positions into its own train and test splits."""
    keys = data.groups if plan.unit == "group" else [data.label_names[label] for label in data.labels]
    if keys is None:
        raise ValueError("the plan splits by group column but the dataset has none; load it with its group-column")
    return [
        site_stream(plan, split.name, [keys[i] for i in split.train], [keys[i] for i in split.test]) for split in sites
    ]


def _check_labels_follow_groups(data: LabelledTexts) -> None:
    if data.groups is None:
        return
    groups_of: dict[int, set[str]] = defaultdict(set)
    for label, group in zip(data.labels.tolist(), data.groups):
        groups_of[label].add(group)
    split = {data.label_names[label]: sorted(g) for label, g in groups_of.items() if len(g) > 1}
    if split:
        name, where = next(iter(split.items()))
        fail(
            "stream-by",
            "group",
            f"label {name!r} occurs in groups {where} ({len(split)} such labels), so groups do not split the labels; "
            "use stream = domain-incremental, or stream-by = label",
        )
