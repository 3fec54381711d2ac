"""The federation's experience plan: what each experience holds, a pure function of public names and the seed.

The plan is decided once for the whole federation from public facts only (the
run config's ``labels``, ``groups`` and stream keys), so that experience ``e``
means the same thing at every site, and the server needs no data to compute
it. ``members[e]`` are label names (``unit == "label"``) or group values
(``unit == "group"``); they are disjoint and together cover every name.

- ``stream = none``: one experience holding every label.
- ``class-incremental`` (``stream-by = label``): disjoint label sets, from
  explicit ``stream-groups`` (``"a,b;c,d;e"``, kept in order) or a seeded split
  into ``num-experiences`` sets. A seeded split is Avalanche's
  ``class_incremental_benchmark`` applied to the names, with set sizes that
  differ by at most one, so a stream here matches an Avalanche benchmark built
  with the same seed.
- ``domain-incremental`` (``stream-by = group``): experiences are sets of
  group values; every label may occur in every experience.

Class-incremental experiences by *group* (CLINC150: an intent follows its
domain) need the label-to-group mapping, which only the data knows; the
simulation launcher (which sees the whole dataset) resolves such a stream into
explicit label sets before the run; a deployment writes the label sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcl.run_config import ConfigError, RunConfig

STREAM_KINDS = ("none", "class-incremental", "domain-incremental")
STREAM_UNITS = ("label", "group")
SHOWN_NAMES = 20  # how many known names an error message lists


@dataclass(frozen=True)
class ExperiencePlan:
    """What every experience holds, the same at every site (see the module docstring)."""

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

    def experience_of(self, keys: list[str]) -> np.ndarray:
        """For each key (a record's label name, or its group value with ``unit == "group"``), its experience.

        Raises ValueError naming the first keys the plan does not place.
        """
        position = {name: e for e, members in enumerate(self.members) for name in members}
        missing = sorted({k for k in keys if k not in position})
        if missing:
            raise ValueError(f"the plan does not place {missing[:5]}; every {self.unit} must be in the run config")
        return np.fromiter((position[k] for k in keys), dtype=np.int64, count=len(keys))

    def label_ids(self, label_names: list[str]) -> list[np.ndarray]:
        """Per experience, the sorted label ids it may hold (public): its members, or every label by group."""
        if self.unit == "group":
            return [np.arange(len(label_names), dtype=np.int64) for _ in self.members]
        index = {name: i for i, name in enumerate(label_names)}
        return [np.array(sorted(index[name] for name in members), dtype=np.int64) for members in self.members]


def parse_groups(spec: str, key: str = "stream-groups") -> list[list[str]]:
    """Parse ``"a,b;c,d;e"`` into ``[["a", "b"], ["c", "d"], ["e"]]`` (names stripped).

    Raises :class:`ConfigError` for an empty group or an empty name.
    """
    groups = []
    for number, part in enumerate(spec.split(";"), start=1):
        names = [name.strip() for name in part.split(",")]
        if not part.strip() or any(not name for name in names):
            fail(key, spec, f'group {number} is empty or has an empty name; write groups like "a,b;c,d;e"')
        groups.append(names)
    return groups


def plan_experiences(
    label_names: list[str],
    group_names: list[str] | None,
    kind: str,
    unit: str = "label",
    num_experiences: int = 0,
    groups: str = "",
    seed: int = 0,
) -> ExperiencePlan:
    """Decide what each experience holds from public names (see the module docstring).

    ``num_experiences = 0`` means one experience per explicit group, or per
    group value with ``unit = "group"``. Raises :class:`ConfigError` for
    unknown names, a name in two groups, names left out of every group, more
    experiences than names, or group values the kind needs but nobody declared.
    """
    if kind not in STREAM_KINDS:
        fail("stream", kind, f"use one of {', '.join(STREAM_KINDS)}")
    if unit not in STREAM_UNITS:
        fail("stream-by", unit, f"use one of {', '.join(STREAM_UNITS)}")
    if num_experiences < 0:
        fail("num-experiences", num_experiences, "use 0 (derived from the groups) or a positive number")
    if kind == "none":
        if groups.strip() or num_experiences > 1:
            fail(
                "stream",
                kind,
                "stream-groups and num-experiences need stream = class-incremental or domain-incremental",
            )
        return ExperiencePlan(kind, "label", (tuple(label_names),))
    if kind == "domain-incremental" and unit != "group":
        fail("stream-by", unit, "domain-incremental experiences are values of the group column; set stream-by = group")
    if unit == "group":
        if not group_names:
            fail("stream-by", unit, "no group values are declared; set groups (and group-column), or stream-by = label")
        names = sorted(group_names)
    else:
        names = list(label_names)
    what = "label" if unit == "label" else "group value"
    if groups.strip():
        chosen = checked_groups(parse_groups(groups), names, what)
        if num_experiences not in (0, len(chosen)):
            fail(
                "num-experiences",
                num_experiences,
                f"stream-groups defines {len(chosen)} experiences; set num-experiences = 0 or {len(chosen)}",
            )
        return ExperiencePlan(kind, unit, tuple(tuple(g) for g in chosen))
    if num_experiences == 0:
        if unit == "label":
            fail("num-experiences", 0, "with stream-by = label give num-experiences >= 1 or explicit stream-groups")
        num_experiences = len(names)
    if num_experiences > len(names):
        fail(
            "num-experiences",
            num_experiences,
            f"only {len(names)} {what}s to split; use num-experiences <= {len(names)}",
        )
    parts = seeded_partition(len(names), num_experiences, seed)
    return ExperiencePlan(kind, unit, tuple(tuple(names[i] for i in part) for part in parts))


def plan_from_config(config: RunConfig) -> ExperiencePlan:
    """The run's plan from its public keys alone (``labels``, ``groups``, stream keys, seed).

    Raises :class:`ConfigError` when ``labels`` is empty (a deployment must
    declare the federation's label set) or the stream keys do not fit it.
    """
    if not config.label_names:
        fail("labels", config.labels, 'declare the federation\'s label set once, e.g. labels="flu,cold,other"')
    if config.stream == "class-incremental" and config.stream_by == "group":
        fail(
            "stream-by",
            "group",
            "class-incremental experiences by group need the label-to-group mapping, which only the data knows; "
            "write stream-by = label and stream-groups with each experience's labels (the simulation launcher "
            "does this for you)",
        )
    return plan_experiences(
        config.label_names,
        config.group_names or None,
        config.stream,
        config.stream_by,
        config.num_experiences,
        config.stream_groups,
        config.seed,
    )


def describe_plan(plan: ExperiencePlan) -> str:
    """One line per experience, for logs: ``experience 0: a, b``."""
    return "; ".join(f"experience {e}: {', '.join(members)}" for e, members in enumerate(plan.members))


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


def checked_groups(groups: list[list[str]], known: list[str], what: str) -> list[list[str]]:
    """Return ``groups`` if every known name is in exactly one group and no unknown name appears; else ConfigError."""
    known_set = set(known)
    seen: dict[str, int] = {}
    spec = ";".join(",".join(g) for g in groups)
    for number, group in enumerate(groups, start=1):
        unknown = [name for name in group if name not in known_set]
        if unknown:
            shown = ", ".join(known[:SHOWN_NAMES]) + (" ..." if len(known) > SHOWN_NAMES else "")
            fail("stream-groups", spec, f"group {number} names unknown {what}s {unknown}; known {what}s: {shown}")
        for name in group:
            if name in seen:
                fail(
                    "stream-groups",
                    spec,
                    f"{what} {name!r} is in group {seen[name]} and group {number}; put it in exactly one group",
                )
            seen[name] = number
    left_out = [name for name in known if name not in seen]
    if left_out:
        fail("stream-groups", spec, f"{what}s {left_out[:SHOWN_NAMES]} are in no group; add each to one group")
    return groups


def fail(key: str, value: Any, fix: str) -> None:
    """Raise the one-line :class:`ConfigError` for a run-config key."""
    raise ConfigError(f"config key '{key}' = {value!r}: {fix}")


@dataclass(frozen=True)
class SiteExperience:
    """One experience at one site: positions (row numbers) into the site's train and test records."""

    index: int
    train: np.ndarray
    test: np.ndarray

    @property
    def is_empty(self) -> bool:
        """True when the site has no training record in this experience (it still runs: noise only)."""
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


def site_stream(plan: ExperiencePlan, site: str, train_keys: list[str], test_keys: list[str]) -> SiteStream:
    """A site's experiences from its records' keys (label names, or group values by group), in row order."""
    train_owner, test_owner = plan.experience_of(train_keys), plan.experience_of(test_keys)
    return SiteStream(
        site,
        tuple(
            SiteExperience(e, np.flatnonzero(train_owner == e), np.flatnonzero(test_owner == e))
            for e in range(len(plan))
        ),
    )
