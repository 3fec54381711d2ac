"""The site's stream and the continual hooks of its round: the experience plan, replay and EWC.

Every run is a stream: a plain run is a stream with one experience holding
every label (``fedcl/experience_plan.py``), so one site round serves both.

- :func:`stream_context`: the global experience plan (public: a seeded
  function of the run config's label set and stream keys), this site's
  records per experience, and the schedule.
- :func:`absorb_finished`: the replay buffer (``client/replay_buffer.py``:
  each record kept by an independent keyed Bernoulli draw) absorbs every
  finished experience, once.
- EWC (``client/ewc.py``): which experience's importances a round estimates
  (:func:`pending_importance`), the Poisson batches of that estimate
  (:func:`importance_batches`), consolidation with the received global model
  as the anchor, and the penalty gradient for the phase's trainable parameters
  (added after the noise).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from client.ewc import EwcState
from client.head_features import head_module
from client.local_training import Encoded
from client.mechanisms import RecordGroups
from client.replay_buffer import ReplayBuffer, record_ids
from client.secure_noise import NoiseSource
from client.site_runtime import SiteRuntime
from fedcl.experience_plan import ExperiencePlan, SiteStream, plan_from_config, site_stream
from fedcl.experience_schedule import PROBE, ExperienceSchedule
from fedcl.worker_cache import WORKER_CACHE


@dataclass(frozen=True)
class StreamContext:
    """A site's view of the stream: the global plan, its own experiences, the schedule."""

    plan: ExperiencePlan
    stream: SiteStream
    schedule: ExperienceSchedule
    labels: tuple[np.ndarray, ...]  # per experience, the label ids the global plan gives it (public)

    def train_positions(self, experience: int) -> np.ndarray:
        """Rows of the site's train split in a training experience (joint: every row of every experience)."""
        if self.schedule.joint:
            return np.sort(np.concatenate([e.train for e in self.stream.experiences]))
        return self.stream.experiences[experience].train

    def seen_labels(self, experiences: int) -> np.ndarray:
        """Label ids of the first ``experiences`` experiences (the global plan's: public), sorted."""
        return np.unique(np.concatenate(self.labels[: max(experiences, 1)]))

    def check_plan(self, sent: str) -> None:
        """Raise ValueError if the server's plan (JSON, when sent) differs from the one this site derives."""
        if sent and json.loads(sent) != self.plan.to_dict():
            raise ValueError(
                "the server's experience plan differs from this site's: server and sites must run the "
                "same labels, stream keys and seed"
            )


def stream_context(runtime: SiteRuntime) -> StreamContext:
    """The site's stream context, built once per process, config and site (the plan is seeded and public)."""
    config = runtime.config
    key = (
        tuple(sorted(config.to_flat().items())),
        runtime.data.name,
        hash((*runtime.data.train_keys, None, *runtime.data.test_keys)),
    )

    def build() -> StreamContext:
        plan = plan_from_config(config)
        stream = site_stream(plan, runtime.data.name, runtime.data.train_keys, runtime.data.test_keys)
        schedule = ExperienceSchedule.from_config(config, len(plan))
        return StreamContext(plan, stream, schedule, tuple(plan.label_ids(config.label_names)))

    return WORKER_CACHE.get_or_build("stream-context", key, build)


def experience_groups(runtime: SiteRuntime, context: StreamContext, experiences: Iterable[int]) -> RecordGroups:
    """The record groups (the plan's public cells) of ``experiences``: label names, or group values of the column."""
    plan = context.plan
    partition = "label" if plan.unit == "label" else runtime.data.stream_partition  # "group:<column>"
    return RecordGroups.of(partition, (name for e in experiences for name in plan.members[e]))


def absorb_finished(
    runtime: SiteRuntime, context: StreamContext, folder: Any, experience: int, inclusion_probability: float
) -> ReplayBuffer:
    """Load the buffer and offer it every finished experience it has not absorbed yet; save it if it changed.

    Empty experiences are absorbed too (nothing is kept), so what the buffer
    did never depends on which experiences a site holds records of.
    """
    buffer = ReplayBuffer.load(folder, inclusion_probability)
    train = runtime.data.train
    changed = False
    for past in range(experience):
        positions = context.train_positions(past)
        index = torch.as_tensor(positions, dtype=torch.long)
        ids = record_ids(train.inputs["input_ids"][index], train.labels[index])
        changed |= buffer.update(positions, ids, past, experience_groups(runtime, context, [past]))
    if changed:
        buffer.save(folder)
    return buffer


def pending_importance(ewc: EwcState | None, experience: int) -> int | None:
    """The experience whose importances this round estimates (the previous one, once), or None.

    Decided by the schedule and the EWC state alone (public), never by whether
    the site holds records of that experience: an empty one gets a noise-only
    estimate.
    """
    previous = experience - 1
    if ewc is None or previous < 0 or previous in ewc.experiences:
        return None
    return previous


def importance_batches(
    runtime: SiteRuntime,
    positions: np.ndarray,
    steps: int,
    sample_rate: float,
    lora: bool,
    features: torch.Tensor | None,
    noise: NoiseSource,
) -> Iterator[tuple[Any, torch.Tensor]]:
    """``steps`` Poisson batches (rate ``sample_rate``) of ``positions``: tokenised rows (LoRA) or head inputs."""
    index = torch.as_tensor(positions, dtype=torch.long)
    labels = runtime.data.train.labels
    for _ in range(steps):
        draw = index[noise.poisson(len(index), sample_rate)]
        if lora:
            yield runtime.data.train.rows(draw), labels[draw]
        else:
            yield features[draw], labels[draw]  # type: ignore[index]


def head_prefix(model: Any) -> str:
    """The parameter-name prefix of the trainable head inside the PEFT model (``...modules_to_save.default.``)."""
    head = head_module(model)
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    raise ValueError("the trainable head is not a submodule of the model; build it with task type SEQ_CLS")


def incremental_rows(runtime: SiteRuntime, context: StreamContext, experience: int) -> np.ndarray | None:
    """Head rows the probe trains: the classes seen so far (None: every row; joint, all seen, or not Linear)."""
    if context.schedule.joint or not isinstance(head_module(runtime.adapter.model), torch.nn.Linear):
        return None
    rows = context.seen_labels(experience + 1)
    return None if len(rows) == len(runtime.data.label_names) else rows


def seen_rows_only(
    runtime: SiteRuntime, context: StreamContext, previous: int, importance: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Zero the head's importances on the rows of classes not seen by the end of ``previous``.

    Those rows never trained (probe rounds train the seen rows only), so their
    anchor is just their initial value: holding them there would only stop the
    classes still to come from being learnt. Which rows is public (the plan).
    """
    rows = incremental_rows(runtime, context, previous)
    if rows is None:
        return importance
    prefix = head_prefix(runtime.adapter.model)
    kept = {}
    for name, value in importance.items():
        if name.startswith(prefix):
            masked = np.zeros_like(value)
            masked[rows] = value[rows]
            value = masked
        kept[name] = value
    return kept


def penalty(runtime: SiteRuntime, ewc: EwcState | None, phase: str, rows: np.ndarray | None = None) -> Callable | None:
    """The EWC ``extra_gradient`` for this phase's trainable parameters (the head alone in probe rounds).

    ``rows``: the probe trains only these rows of a Linear head; the terms are sliced to match.
    """
    lam = runtime.config.ewc_lambda
    if ewc is None or not ewc.importances or lam == 0:
        return None
    if phase != PROBE:
        return functools.partial(ewc.penalty_gradient, ewc_lambda=lam)
    prefix = head_prefix(runtime.adapter.model)
    keep = slice(None) if rows is None else rows

    def head_part(terms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k[len(prefix) :]: v[keep] for k, v in terms.items() if k.startswith(prefix)}

    head_terms = EwcState(
        ewc.mode,
        ewc.decay,
        [head_part(f) for f in ewc.importances],
        [head_part(a) for a in ewc.anchors],
        list(ewc.experiences),
    )
    return functools.partial(head_terms.penalty_gradient, ewc_lambda=lam)


def pool_rows(runtime: SiteRuntime, pool: np.ndarray) -> Encoded:
    """The tokenised rows of ``pool`` (positions into the site's train split)."""
    index = torch.as_tensor(pool, dtype=torch.long)
    return Encoded(runtime.data.train.rows(index), runtime.data.train.labels[index])
