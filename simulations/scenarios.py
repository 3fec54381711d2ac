"""Scenarios: split one dataset into sites, each with its own train and test split.

- ``iid``: a seeded shuffle dealt evenly to the sites.
- ``dirichlet``: for every label, site shares drawn from Dirichlet(alpha), so
  each site sees a skewed label mix (smaller alpha, stronger skew).
- ``group``: one site per value of the group column (e.g. MedQuAD's NIH
  sources as natural hospitals); with fewer sites than groups, the largest
  ``num-sites`` groups become the sites and the rest are left out.

Everything is reproducible from ``seed``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from fedcl.run_config import ConfigError, RunConfig


@dataclass(frozen=True)
class SiteSplit:
    """One site's share of the dataset, as indices into it."""

    name: str
    train: np.ndarray
    test: np.ndarray


def assign_sites(labels: np.ndarray, groups: list[str] | None, config: RunConfig) -> list[np.ndarray]:
    """Indices of the examples each site holds (disjoint; every example at most once)."""
    rng = np.random.default_rng(config.seed)
    n, k = len(labels), config.num_sites
    if config.partition == "group":
        if groups is None:
            raise ConfigError(
                "config key 'partition' = 'group': the dataset has no group column; set group-column "
                "to a column that names each example's site (e.g. 'source' for MedQuAD)"
            )
        counts = Counter(groups)
        if k > len(counts):
            raise ConfigError(
                f"config key 'num-sites' = {k}: the group column has only {len(counts)} values; "
                f"use num-sites <= {len(counts)}"
            )
        chosen = sorted(counts, key=lambda g: (-counts[g], g))[:k]
        group_array = np.array(groups)
        return [np.flatnonzero(group_array == g) for g in chosen]
    if n < 2 * k:
        raise ConfigError(
            f"config key 'num-sites' = {k}: the dataset has only {n} examples, too few for a train and a "
            f"test example at every site; use num-sites <= {max(1, n // 2)}"
        )
    if config.partition == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), k)]
    # Dirichlet label skew: deal each label's examples by Dirichlet shares.
    owners = np.empty(n, dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(k, config.dirichlet_alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for site, part in enumerate(np.split(members, cuts)):
            owners[part] = site
    return [np.flatnonzero(owners == site) for site in range(k)]


def split_sites(labels: np.ndarray, groups: list[str] | None, config: RunConfig) -> list[SiteSplit]:
    """Split the dataset into ``num-sites`` sites, each with a train and a test split."""
    rng = np.random.default_rng(config.seed + 1)
    sites = []
    for site, members in enumerate(assign_sites(labels, groups, config)):
        shuffled = rng.permutation(members)
        n_test = int(round(len(shuffled) * config.test_fraction))
        test, train = shuffled[:n_test], shuffled[n_test:]
        if config.max_train_examples:
            train = train[: config.max_train_examples]
        if config.max_test_examples:
            test = test[: config.max_test_examples]
        if len(train) == 0 or len(test) == 0:
            raise ConfigError(
                f"config key 'num-sites' = {config.num_sites}: site {site} gets {len(train)} train and "
                f"{len(test)} test examples; use fewer sites, a larger dataset, or a larger "
                "dirichlet-alpha (less skew)"
            )
        sites.append(SiteSplit(f"site-{site}", np.sort(train), np.sort(test)))
    return sites
