"""The continual scenario of a run config: its experience plan, every site's stream, and the checks before training.

Used by the launcher's preflight (every data-dependent error of the stream
keys surfaces there, before Flower starts), by the server (the number of
experiences and the plan it sends) and by the sites (their own stream).
"""

from __future__ import annotations

from collections.abc import Sequence

from client.replay_buffer import check_replay_settings
from fedcl.run_config import ConfigError, RunConfig
from simulations.data_sources import LabelledTexts
from simulations.scenarios import SiteSplit
from simulations.streams import ExperiencePlan, SiteStream, plan_experiences, site_streams


def experience_plan(config: RunConfig, data: LabelledTexts) -> ExperiencePlan:
    """The plan the stream keys describe (``stream = none``: one experience holding every label).

    Raises :class:`ConfigError` for unknown labels or group values in
    ``stream-groups``, more experiences than labels, and the like.
    """
    return plan_experiences(
        data, config.stream, config.stream_by, config.num_experiences, config.stream_groups, config.seed
    )


def check_stream(config: RunConfig, data: LabelledTexts, sites: Sequence[SiteSplit]) -> list[str]:
    """Check the stream against the data before training; returns notes (empty experiences: noise-only rounds).

    Raises :class:`ConfigError` for a bad plan, a replay size larger than a
    site's training data, or a site with no training record in any experience.
    """
    if not config.continual:
        return []
    plan = experience_plan(config, data)
    streams = site_streams(plan, data, sites)
    notes = []
    for split, stream in zip(sites, streams):
        if config.replay_size:
            check_replay_settings(config.replay_size, config.replay_policy, len(split.train), split.name)
        empty = stream.empty_experiences()
        if len(empty) == len(stream):
            raise ConfigError(
                f"config key 'stream-groups' = {config.stream_groups!r}: {split.name} has no training "
                "record in any experience; use other groups, partition or sites"
            )
        if empty and not config.joint:
            notes.append(
                f"{split.name} has no training records in experience(s) {empty}: it runs its rounds "
                "there on an empty pool (noise only: a skip would tell the server), and is still evaluated "
                "on them"
            )
    return notes


def describe_plan(plan: ExperiencePlan) -> str:
    """One line per experience, for logs: ``experience 0: a, b``."""
    return "; ".join(f"experience {e}: {', '.join(members)}" for e, members in enumerate(plan.members))


def streams_of(
    config: RunConfig, data: LabelledTexts, sites: Sequence[SiteSplit]
) -> tuple[ExperiencePlan, list[SiteStream]]:
    """The plan and every site's stream."""
    plan = experience_plan(config, data)
    return plan, site_streams(plan, data, sites)
