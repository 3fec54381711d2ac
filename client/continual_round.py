"""One site's training round in a stream of experiences: replay, EWC and DP-SGD on the right records.

The server says which slot a round belongs to (``experience``), the round
within it and the phase (``fedcl/experience_schedule.py``); the site's own
experience is the slot minus its offset. A round:

1. Skips, with the reason, when the site has not started its stream yet, has
   finished it, or holds no training record of its current experience.
2. On entering experience ``e`` (the first round that sees it): the replay
   buffer absorbs the site's records of every finished experience (Avalanche's
   storage policy, ``client/replay_buffer.py``) and is saved atomically; with
   ``ewc-lambda > 0`` the importances of experience ``e - 1`` are estimated
   inside the Gaussian mechanism on that experience's records (recorded in the
   ledger before anything else is saved) and consolidated with the received
   global adapter (the model at the end of ``e - 1``) as the anchor.
3. Trains on the pool ``current experience + buffer`` (each record once),
   which DP-SGD samples with Poisson sampling: replayed records are in every
   step the ledger records. Probe rounds train the head on the cached head
   inputs of the pool rows, on the head rows of the classes seen so far;
   LoRA rounds train LoRA + head on the pool's
   tokenised rows. The EWC penalty gradient is added after clipping and
   noise (``extra_gradient``), on the parameters that train in the phase
   (the head in probe rounds, LoRA + head in LoRA rounds).

Noise: calibrated once for everything the site still plans (this
experience's remaining rounds, then for every later experience its importance
batches and both phases), with future pools estimated by the current pool's
size; a new experience changes the plan, so the site calibrates again against
the ledger's history (warm-started, ``client/warm_calibration.py``), and the total stays within the budget.
With ``ewc-importance-noise > 0`` the importance batches use that fixed noise
multiplier instead, and the calibration accounts for them as fixed steps.
"""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from flwr.common.logger import log

from client.dp_training import PrivateOutcome, train_private, train_private_features
from client.ewc import EwcState, ImportanceEstimate, anchor_arrays, estimate_importance
from client.head_features import head_module
from client.local_training import Encoded, trim_padding
from client.noise_plan import Segment
from client.privacy_ledger import BudgetError, PrivacyLedger, Step
from client.replay_buffer import ReplayBuffer, training_pool
from client.site_runtime import SiteRuntime, dataset_and_sites
from client.site_state import SiteState
from client.warm_calibration import noise_for_plan
from client.site_trainer import (PROBE, PROBE_MOMENTUM, UNBOUNDED_CLIP, RoundResult, _privacy_metrics, budget_stop,
                                 cached_head_inputs, open_ledger)
from fedcl.experience_schedule import ExperienceSchedule
from simulations.continual_setup import streams_of
from simulations.streams import ExperiencePlan, SiteStream, experience_labels


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
        return np.unique(np.concatenate(self.labels[:max(experiences, 1)]))

    def check_plan(self, sent: str) -> None:
        """Raise ValueError if the server's plan (JSON, when sent) differs from the one this site derives."""
        if sent and json.loads(sent) != self.plan.to_dict():
            raise ValueError("the server's experience plan differs from this site's: server and sites must run the "
                             "same dataset, stream keys and seed")


_CONTEXTS: dict[tuple, StreamContext] = {}


def stream_context(runtime: SiteRuntime) -> StreamContext:
    """The site's stream context, built once per process and config (the plan is seeded and global)."""
    config = runtime.config
    key = (tuple(sorted(config.to_flat().items())), runtime.data.index)
    if key not in _CONTEXTS:
        data, sites = dataset_and_sites(config)
        plan, streams = streams_of(config, data, sites)
        schedule = ExperienceSchedule.from_config(config, len(plan))
        _CONTEXTS[key] = StreamContext(plan, streams[runtime.data.index], schedule,
                                       tuple(experience_labels(plan, data)))
    return _CONTEXTS[key]


def train_continual_round(runtime: SiteRuntime, round_config: Mapping[str, Any], state: SiteState) -> RoundResult:
    """Train one round of a stream (see the module docstring); privately unless ``dp = false``."""
    config, context = runtime.config, stream_context(runtime)
    context.check_plan(str(round_config.get("experience-plan", "")))
    slot, within = int(round_config["experience"]), int(round_config["experience-round"])
    phase = str(round_config["phase"])
    experience = context.schedule.site_experience(slot, runtime.data.index)
    skipped = _skip_reason(context, runtime, slot, experience)
    if skipped:
        log(INFO, "%s, round %s: skipped: %s", runtime.data.name, round_config.get("server-round"), skipped)
        return RoundResult("skipped", skipped, {"experience": experience})
    current = context.train_positions(experience)
    buffer = _absorb_finished(runtime, context, state, experience)
    pool = training_pool(current, buffer)
    ewc = EwcState.load(state.folder, config.ewc_mode, config.ewc_decay) if config.ewc_lambda > 0 else None
    pending = _pending_importance(context, ewc, experience)
    rows = _incremental_rows(runtime, context, experience)
    facts = {"experience": experience, "pool-examples": len(pool), "replayed-examples": len(pool) - len(current),
             "num-examples": len(pool)}
    if not config.dp:
        seed = config.seed * 100_003 + int(round_config.get("server-round", 0)) * 101 + runtime.data.index
        if pending is not None:
            _consolidate(runtime, context, state, ewc, pending, 0.0, private=False, seed=seed)
        outcome = _train_pool(runtime, phase, pool, 0.0, UNBOUNDED_CLIP, seed, _penalty(runtime, ewc, phase, rows),
                              rows)
        return RoundResult("trained", "", {**facts, **_outcome_metrics(outcome)})
    ledger = open_ledger(state, config)
    plan, fixed = planned_segments(runtime, context.schedule, experience, within, len(pool), len(current),
                                   _importance_records(context, pending))
    try:
        sigma = config.noise_multiplier or noise_for_plan(state.noise_plan, _with_fixed(ledger, fixed), plan).noise_multiplier
    except BudgetError as err:  # nothing left for the remaining plan: the hard stop, not a crash
        return budget_stop(ledger, err, facts)
    importance_step = _importance_step(runtime, context, pending, sigma)
    round_rate = _sample_rate(config.probe_batch_size if phase == PROBE else config.batch_size, len(pool))
    round_steps = config.probe_steps if phase == PROBE else config.local_steps
    trial = PrivacyLedger(ledger.target_epsilon, ledger.delta, ledger.accountant, list(ledger.history))
    if importance_step is not None:
        trial.record(*importance_step)
    if not trial.can_afford(sigma, round_rate, round_steps):
        spent = ledger.epsilon()
        reason = (f"privacy budget: epsilon spent {spent:.3f} of {config.target_epsilon}; this round "
                  f"({round_steps} steps at sample rate {round_rate:.3g}, noise {sigma:.3g}"
                  f"{', plus the EWC importance batches' if importance_step else ''}) would reach "
                  f"{trial.epsilon_if(sigma, round_rate, round_steps):.3f}")
        return RoundResult("skipped", reason, {**facts, "epsilon": spent, "stopped-for-budget": 1,
                                               **_privacy_metrics(ledger, sigma, round_rate, config)})
    if pending is not None:
        estimate = _consolidate(runtime, context, state, ewc, pending, importance_step[0], private=True, seed=None,
                                ledger=ledger)
        facts["ewc-importance-steps"] = estimate.ledger_steps.steps
    outcome = _train_pool(runtime, phase, pool, sigma, config.max_grad_norm, None, _penalty(runtime, ewc, phase, rows),
                          rows)
    ledger.record(sigma, outcome.sample_rate, outcome.steps)
    ledger.save(state.ledger)
    return RoundResult("trained", "", {**facts, **_outcome_metrics(outcome), "epsilon": ledger.epsilon(),
                                       "stopped-for-budget": 0,
                                       **_privacy_metrics(ledger, sigma, outcome.sample_rate, config)})


def _skip_reason(context: StreamContext, runtime: SiteRuntime, slot: int, experience: int) -> str:
    schedule = context.schedule
    if experience < 0:
        return f"not started: this site joins the stream late and starts experience 0 in slot {slot - experience}"
    if experience >= schedule.training_experiences:
        return f"stream finished: this site trained its {schedule.training_experiences} experience(s)"
    if len(context.train_positions(experience)) == 0:
        log(WARNING, "%s: experience %d has no training records here; skipping it", runtime.data.name, experience)
        return f"empty experience: this site has no training records in experience {experience}"
    return ""


def planned_segments(runtime: SiteRuntime, schedule: ExperienceSchedule, experience: int, within: int,
                     pool_size: int, current_size: int, importance_records: int) -> tuple[list[Segment], list[Step]]:
    """The site's remaining DP plan: segments at the calibrated noise, and fixed-noise importance steps.

    This round's importance batches (on ``importance_records`` records of the
    previous experience; 0: none) come first, then the rest of this slot, then
    every later experience (importances on ``current_size`` records, both
    phases on a pool of ``pool_size``: the current sizes stand in for the
    unknown future ones).
    """
    config = runtime.config
    probe_rate = _sample_rate(config.probe_batch_size, pool_size)
    lora_rate = _sample_rate(config.batch_size, pool_size)
    batches = config.ewc_importance_batches if config.ewc_lambda > 0 else 0
    segments: list[Segment] = []
    fixed: list[Step] = []

    def importance(records: int) -> None:
        if batches and records:
            rate = _sample_rate(_importance_batch_size(runtime, schedule), records)
            if config.ewc_importance_noise > 0:
                fixed.append((config.ewc_importance_noise, rate, batches))
            else:
                segments.append((rate, batches))

    importance(importance_records)
    probe_left, lora_left = schedule.rounds_left_in_slot(within)
    segments += [(probe_rate, probe_left * config.probe_steps), (lora_rate, lora_left * config.local_steps)]
    now = _merged(segments)
    segments = []
    for _ in range(experience + 1, schedule.training_experiences):
        importance(current_size)
        segments += [(probe_rate, schedule.probe_rounds * config.probe_steps),
                     (lora_rate, schedule.lora_rounds * config.local_steps)]
    return now + _merged(segments), fixed


def _merged(segments: list[Segment]) -> list[Segment]:
    """One segment per sample rate, in order of first appearance, zero-step ones dropped.

    Composition does not depend on the order of the steps, and fewer
    distinct entries make each PRV evaluation of the calibration cheaper. The
    current slot is merged apart from the later experiences, so the plan
    shrinks from the front as rounds are taken and ``load_or_calibrate``
    keeps recognising it until the next experience.
    """
    steps: dict[float, int] = {}
    for rate, count in segments:
        if count > 0:
            steps[rate] = steps.get(rate, 0) + count
    return list(steps.items())


def _with_fixed(ledger: PrivacyLedger, fixed: list[Step]) -> PrivacyLedger:
    """The ledger as the calibration must see it: history plus the planned fixed-noise steps."""
    if not fixed:
        return ledger
    return PrivacyLedger(ledger.target_epsilon, ledger.delta, ledger.accountant, [*ledger.history, *fixed])


def _sample_rate(expected_batch: int, records: int) -> float:
    """Poisson sample rate of DP-SGD for ``records`` (the trainers use ``min(batch, records) / records``)."""
    return min(expected_batch, records) / records if records else 1.0


def _importance_batch_size(runtime: SiteRuntime, schedule: ExperienceSchedule) -> int:
    """Expected batch of the importance estimate: the LoRA batch when LoRA trains, else the probe's."""
    return runtime.config.batch_size if schedule.lora_rounds else runtime.config.probe_batch_size


def _pending_importance(context: StreamContext, ewc: EwcState | None, experience: int) -> int | None:
    """The experience whose importances this round must estimate (the previous one, once), or None."""
    previous = experience - 1
    if ewc is None or previous < 0 or previous in ewc.experiences or len(context.train_positions(previous)) == 0:
        return None
    return previous


def _importance_records(context: StreamContext, pending: int | None) -> int:
    return 0 if pending is None else len(context.train_positions(pending))


def _importance_step(runtime: SiteRuntime, context: StreamContext, pending: int | None,
                     sigma: float) -> Step | None:
    """The ledger entry of this round's importance estimate, or None."""
    if pending is None:
        return None
    config = runtime.config
    rate = _sample_rate(_importance_batch_size(runtime, context.schedule), _importance_records(context, pending))
    return (config.ewc_importance_noise or sigma, rate, config.ewc_importance_batches)


def _absorb_finished(runtime: SiteRuntime, context: StreamContext, state: SiteState,
                     experience: int) -> ReplayBuffer | None:
    """Load the buffer and offer it every finished experience it has not absorbed yet; save it if it changed."""
    config = runtime.config
    if not config.replay_size:
        return None
    buffer = ReplayBuffer.load(state.folder, config.replay_size, config.replay_policy,
                               config.seed * 1000 + runtime.data.index, len(runtime.data.train), runtime.data.name)
    changed = False
    for past in range(experience):
        positions = context.train_positions(past)
        if past in buffer.experiences or len(positions) == 0:
            continue
        changed |= buffer.update(positions, runtime.data.train.labels[positions].numpy(), past)
    if changed:
        buffer.save(state.folder)
    return buffer


def _consolidate(runtime: SiteRuntime, context: StreamContext, state: SiteState, ewc: EwcState, previous: int,
                 noise_multiplier: float, *, private: bool, seed: int | None,
                 ledger: PrivacyLedger | None = None) -> ImportanceEstimate:
    """Estimate experience ``previous``'s importances, record them in the ledger first, then consolidate and save."""
    estimate = private_importance(runtime, context.train_positions(previous), noise_multiplier,
                                  lora=context.schedule.lora_rounds > 0, private=private, seed=seed)
    if ledger is not None:
        ledger.record(*estimate.ledger_steps)
        ledger.save(state.ledger)
    anchor = anchor_arrays(runtime.adapter.model)  # the received global model: the end of experience `previous`
    importance = _seen_rows_only(runtime, context, previous, estimate.importance)
    ewc.consolidate(previous, importance, {name: anchor[name] for name in importance})
    ewc.save(state.folder)
    log(INFO, "%s: EWC importances of experience %d estimated (%d batches) and consolidated", runtime.data.name,
        previous, estimate.ledger_steps.steps)
    return estimate


def _seen_rows_only(runtime: SiteRuntime, context: StreamContext, previous: int,
                    importance: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero the head's importances on the rows of classes not seen by the end of ``previous``.

    Those rows never trained (probe rounds train the seen rows only), so their
    anchor is just their initial value: holding them there would only stop the
    classes still to come from being learnt. Which rows is public (the plan).
    """
    rows = _incremental_rows(runtime, context, previous)
    if rows is None:
        return importance
    prefix = _head_prefix(runtime.adapter.model)
    kept = {}
    for name, value in importance.items():
        if name.startswith(prefix):
            masked = np.zeros_like(value)
            masked[rows] = value[rows]
            value = masked
        kept[name] = value
    return kept


def private_importance(runtime: SiteRuntime, positions: np.ndarray, noise_multiplier: float, *, lora: bool,
                       private: bool, seed: int | None) -> ImportanceEstimate:
    """EWC importances of the trainable parameters on ``positions`` (Poisson batches, clipped, noised).

    ``lora``: of LoRA + head on the tokenised rows; otherwise of the head on
    the cached head inputs (the only parameters that train). Importances are
    keyed by the full model's parameter names either way.
    """
    config = runtime.config
    batch = config.batch_size if lora else config.probe_batch_size
    rate = _sample_rate(batch, len(positions))
    sampling = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    noise = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed + 1)
    index = torch.as_tensor(positions, dtype=torch.long)
    draws = [index[torch.rand(len(index), generator=sampling) < rate] for _ in range(config.ewc_importance_batches)]
    labels = runtime.data.train.labels
    model, prefix = runtime.adapter.model, ""
    if lora:
        rows: Callable[[torch.Tensor], Any] = lambda rows_index: (
            trim_padding(runtime.data.train.rows(rows_index)) if len(rows_index) else runtime.data.train.rows(rows_index))
        target = model
    else:
        features = cached_head_inputs(runtime, "train")
        rows = features.__getitem__
        target, prefix = head_module(model), _head_prefix(model)
    batches: Iterator = ((rows(draw), labels[draw]) for draw in draws)
    estimate = estimate_importance(target, batches, clip_norm=config.max_grad_norm if private else None,
                                   noise_multiplier=noise_multiplier if private else 0.0, sample_rate=rate,
                                   dataset_size=len(positions), generator=noise)
    if not prefix:
        return estimate
    return ImportanceEstimate({prefix + k: v for k, v in estimate.importance.items()}, estimate.ledger_steps,
                              estimate.noise_std)


def _head_prefix(model: Any) -> str:
    """The parameter-name prefix of the trainable head inside the PEFT model (``...modules_to_save.default.``)."""
    head = head_module(model)
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    raise ValueError("the trainable head is not a submodule of the model; build it with task type SEQ_CLS")


def _incremental_rows(runtime: SiteRuntime, context: StreamContext, experience: int) -> np.ndarray | None:
    """Head rows the probe trains: the classes seen so far (None: every row; joint, or a head that is not Linear)."""
    if context.schedule.joint or not isinstance(head_module(runtime.adapter.model), torch.nn.Linear):
        return None
    return context.seen_labels(experience + 1)


def _penalty(runtime: SiteRuntime, ewc: EwcState | None, phase: str,
             rows: np.ndarray | None = None) -> Callable | None:
    """The EWC ``extra_gradient`` for this phase's trainable parameters (the head alone in probe rounds).

    ``rows``: the probe trains only these rows of a Linear head; the terms are sliced to match.
    """
    lam = runtime.config.ewc_lambda
    if ewc is None or not ewc.importances or lam == 0:
        return None
    if phase != PROBE:
        return functools.partial(ewc.penalty_gradient, ewc_lambda=lam)
    prefix = _head_prefix(runtime.adapter.model)
    keep = slice(None) if rows is None else rows

    def head_part(terms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v[keep] for k, v in terms.items() if k.startswith(prefix)}

    head_terms = EwcState(ewc.mode, ewc.decay, [head_part(f) for f in ewc.importances],
                          [head_part(a) for a in ewc.anchors], list(ewc.experiences))
    return functools.partial(head_terms.penalty_gradient, ewc_lambda=lam)


def _train_pool(runtime: SiteRuntime, phase: str, pool: np.ndarray, sigma: float, clip: float, seed: int | None,
                penalty: Callable | None, rows: np.ndarray | None = None) -> PrivateOutcome:
    """DP-SGD of this phase on the pool records only (clip ``UNBOUNDED_CLIP`` and sigma 0: non-private).

    Probe rounds with ``rows`` train only those rows of the Linear head (the
    classes seen so far, as Avalanche's ``IncrementalClassifier`` grows its
    units): no noise lands on the rows of classes still to come, which would
    otherwise compete at evaluation. Which rows is public (the global plan).
    """
    config, data = runtime.config, runtime.data
    index = torch.as_tensor(pool, dtype=torch.long)
    if phase == PROBE:
        features, labels = cached_head_inputs(runtime, "train")[index], data.train.labels[index]
        head = head_module(runtime.adapter.model)
        part = head if rows is None else _rows_of(head, rows)
        if rows is not None:
            labels = torch.as_tensor(np.searchsorted(rows, labels.numpy()), dtype=torch.long)
        outcome = train_private_features(
            part, features, labels, config.probe_steps, min(config.probe_batch_size, len(pool)),
            config.probe_learning_rate, sigma, clip, seed, optimizer="sgd", momentum=PROBE_MOMENTUM,
            extra_gradient=penalty)
        if rows is not None:
            with torch.no_grad():
                head.weight[torch.as_tensor(rows)] = part.weight
                head.bias[torch.as_tensor(rows)] = part.bias
        return outcome
    subset = Encoded(data.train.rows(index), data.train.labels[index])
    return train_private(runtime.adapter.model, subset, config.local_steps, min(config.batch_size, len(pool)),
                         config.learning_rate, sigma, clip, seed, optimizer="sgd", momentum=PROBE_MOMENTUM,
                         extra_gradient=penalty)


def _rows_of(head: torch.nn.Linear, rows: np.ndarray) -> torch.nn.Linear:
    """A Linear holding a copy of ``rows`` of ``head`` (output units), to train and write back."""
    part = torch.nn.Linear(head.in_features, len(rows), device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        part.weight.copy_(head.weight[torch.as_tensor(rows)])
        part.bias.copy_(head.bias[torch.as_tensor(rows)])
    return part


def _outcome_metrics(outcome: PrivateOutcome) -> dict[str, float]:
    return {"train-loss": outcome.mean_loss, "train-steps": outcome.steps, "train-seconds": outcome.seconds}


def experience_metrics(runtime: SiteRuntime, round_config: Mapping[str, Any]) -> dict[str, float]:
    """Per-experience evaluation counts of the installed global model (``exp-J-correct``/``exp-J-total``).

    Covers the experiences seen by the end of this round's slot (every
    experience for joint); the prediction is the best of the classes seen so
    far (the public plan's; Avalanche's ``IncrementalClassifier`` has units
    for those only), and ``accuracy`` becomes the accuracy over their test
    records pooled. Empty for a run without a stream.
    """
    if not runtime.config.continual:
        return {}
    context, server_round = stream_context(runtime), int(round_config.get("server-round", 1))
    seen = context.seen_labels(context.schedule.experiences_seen(context.schedule.position(server_round).slot))
    with torch.no_grad():
        logits = head_module(runtime.adapter.model)(cached_head_inputs(runtime, "test"))
    predictions = seen[logits[:, torch.as_tensor(seen)].argmax(dim=-1).numpy()]  # among the classes seen so far
    return experience_counts(runtime, predictions, server_round)


def experience_counts(runtime: SiteRuntime, predictions: np.ndarray, server_round: int) -> dict[str, float]:
    """``exp-J-correct``/``exp-J-total`` for the experiences seen after ``server_round``'s slot, and pooled accuracy."""
    context = stream_context(runtime)
    seen = context.schedule.experiences_seen(context.schedule.position(server_round).slot)
    labels = runtime.data.test.labels.numpy()
    metrics: dict[str, float] = {"experiences-seen": seen}
    correct = total = 0
    for j in range(seen):
        rows = context.stream.experiences[j].test
        hits = int((predictions[rows] == labels[rows]).sum())
        metrics[f"exp-{j}-correct"], metrics[f"exp-{j}-total"] = hits, len(rows)
        correct, total = correct + hits, total + len(rows)
    if total:
        metrics["accuracy"], metrics["num-examples"] = correct / total, total
    return metrics
