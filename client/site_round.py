"""One site round, one pipeline for every phase: plan, price, lock, run, record, reply.

1. **Plan.** The site derives the round from the run config and the server
   round alone (``fedcl/experience_schedule.py``): its experience, the phase
   (probe, lora or a class-sum release), the rounds left. A ``phase`` the
   server sends that disagrees is refused. Every sample rate comes from the
   site's public nominal size (``client/site_policy.py``): the expected pool
   of experience ``e`` is ``N / J`` records plus the expected replay buffer
   ``p N e / J``, never a count of its records. The plan therefore depends on
   public values only, and so does every skip.
2. **Price and lock.** :func:`client.site_budget.open_budget` takes the
   site's lock and ledger; the noise multiplier is chosen once for the whole
   remaining plan; the exact mechanism objects of this round (the EWC
   importance estimate at an experience's first round, then the phase) are
   priced by the RDP filter; a round that does not fit is declined (public
   reason).
3. **Run.** The phase runs exactly those objects (``client/phases.py``): an
   empty pool runs noise-only steps, never a data-dependent skip. Replay's
   buffer joins the pool; EWC's penalty gradient is added after the noise.
4. **Record.** Each mechanism is recorded and the ledger saved (atomically,
   then the sentinel) before anything derived from it is saved or sent.
5. **Reply.** Only keys of the allow-list in ``fedcl/protocol.py``; the
   training loss (computed from records without noise) stays in the site's
   local log under DP.

A plain run is a stream with one experience: the same pipeline.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.common.logger import log

from client.continual import (
    StreamContext,
    absorb_finished,
    experience_groups,
    incremental_rows,
    penalty,
    pending_importance,
    seen_rows_only,
    stream_context,
)
from client.ewc import EwcState, anchor_arrays
from client.mechanisms import UNBOUNDED_CLIP, RecordGroups, SgdMechanism, sgd_mechanism
from client.phases import (
    release_dimension,
    run_class_sums,
    run_importance,
    run_lora,
    run_probe,
    run_secure_class_sums,
)
from client.privacy_ledger import BudgetError, Entry
from client.replay_buffer import held_groups, training_pool
from client.secure_noise import NoiseSource
from client.secure_release import BitWidthError, SecureRound, check_bit_width, distributed_release
from client.secure_update import update_scale
from client.site_budget import Segment, SiteBudget, fresh_noise_multiplier, open_budget
from client.site_policy import SitePolicy
from client.site_runtime import SiteRuntime
from client.site_state import SiteState, log_local_metrics
from fedcl.atomic_files import write_json_atomic
from fedcl.experience_schedule import LORA, NCM, PROBE
from fedcl.protocol import PHASE, SERVER_ROUND


@dataclass
class RoundResult:
    """The outcome the client app turns into a reply."""

    status: str  # "trained", "skipped" or "refused"
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    release: dict[str, np.ndarray] | None = None  # a class-sum release (the ncm recipe) instead of the adapter
    weight: int = 0  # a trained probe or LoRA round: the site's public nominal size, its FedAvg weight


@dataclass(frozen=True)
class SitePlan:
    """The public sizes every mechanism of the site is priced from."""

    runtime: SiteRuntime
    context: StreamContext
    policy: SitePolicy
    buffered: frozenset[tuple[str, str]] | None = frozenset()  # groups the stored replay buffer holds; None: unknown

    @property
    def nominal(self) -> int:
        """The site's public record count."""
        return self.policy.nominal(len(self.runtime.data.train))

    @property
    def experiences(self) -> int:
        """Experiences the site trains in sequence (1 for a plain or joint run)."""
        return self.context.schedule.training_experiences

    @property
    def replay_probability(self) -> float:
        """Each finished record's chance to join the buffer: ``replay-size`` over the nominal size (public)."""
        size = self.runtime.config.replay_size
        return min(1.0, size / self.nominal) if size else 0.0

    def experience_size(self) -> float:
        """Expected records of one experience: ``N / J`` (public)."""
        return self.nominal / self.experiences

    def pool_size(self, experience: int) -> float:
        """Expected pool of ``experience``: its records plus the expected buffer of the ones before it."""
        return self.experience_size() * (1 + self.replay_probability * experience)

    def groups_read(self, experience: int, replay: bool) -> RecordGroups | None:
        """The record groups a mechanism of ``experience`` reads (public: the plan's cells), None for every record.

        The experience's own cells; with ``replay``, those of every earlier
        experience and every group the stored buffer already holds (from an
        earlier run, say), since the pool may hold any of their records. A
        joint run, or a buffer whose groups are unknown or of another
        partition, reads every record.
        """
        if self.context.schedule.joint:
            return None
        if not replay:
            return experience_groups(self.runtime, self.context, [experience])
        own = experience_groups(self.runtime, self.context, range(experience + 1))
        if self.buffered is None or any(partition != own.partition for partition, _ in self.buffered):
            return None
        return RecordGroups.of(own.partition, [*own.cells, *(cell for _, cell in self.buffered)])

    def phase_mechanism(self, phase: str, experience: int, sigma: float, clip: float) -> SgdMechanism:
        """The mechanism of one round of ``phase`` in ``experience``."""
        config = self.runtime.config
        if phase == NCM:  # one Gaussian release, sensitivity 1, of the experience's own records
            return SgdMechanism(sigma, 1.0, 1, 1.0, 1.0, self.groups_read(experience, replay=False))
        batch, steps = (
            (config.probe_batch_size, config.probe_steps) if phase == PROBE else (config.batch_size, config.local_steps)
        )
        reads = self.groups_read(experience, replay=self.replay_probability > 0)
        return sgd_mechanism(sigma, batch, self.pool_size(experience), steps, clip, reads)

    def full_batch_note(self, phase: str, experience: int) -> str:
        """A site-local notice when ``phase``'s batch is larger than its pool (sample rate clamped to 1.0), else "".

        Depends on public sizes only, but it goes to the site's own log, never
        into a reply.
        """
        if phase not in (PROBE, LORA):
            return ""
        config = self.runtime.config
        key, batch = (
            ("probe-batch-size", config.probe_batch_size) if phase == PROBE else ("batch-size", config.batch_size)
        )
        pool = self.pool_size(experience)
        if batch <= pool:
            return ""
        where = f" in experience {experience}" if self.experiences > 1 else ""
        return (
            f"fedcl: {self.runtime.data.name}: {key} = {batch} is larger than the {pool:.0f} records its {phase} "
            f"steps sample from{where} (public size), so every step reads every record (sample rate 1.0 instead of "
            f"{batch} / {pool:.0f}); the pricing is exact (full-batch Gaussian steps), only without amplification by "
            f"sampling: fine for a small site, or set {key} below the record count"
        )

    def importance_mechanism(self, experience: int, sigma: float, clip: float) -> SgdMechanism:
        """The EWC importance estimate on the records of ``experience`` (the one just finished)."""
        config = self.runtime.config
        batch = config.batch_size if self.context.schedule.lora_rounds else config.probe_batch_size
        fixed = config.ewc_importance_noise
        return sgd_mechanism(
            fixed if fixed > 0 and sigma > 0 else sigma,
            batch,
            self.experience_size(),
            config.ewc_importance_batches,
            clip,
            self.groups_read(experience, replay=False),
        )

    def remaining(self, experience: int, within: int, importance_now: bool) -> tuple[list[Segment], list[Entry]]:
        """What the site still plans from this round on: segments at the sigma being chosen, fixed-noise entries.

        Each names the record groups it reads, so the budget prices the plan per record.
        """
        config, schedule = self.runtime.config, self.context.schedule
        segments: list[Segment] = []
        fixed: list[Entry] = []

        def importance(finished: int) -> None:
            if config.ewc_lambda > 0:
                mechanism = self.importance_mechanism(finished, 1.0, 1.0)
                if config.ewc_importance_noise > 0:
                    fixed.append((config.ewc_importance_noise, mechanism.sample_rate, mechanism.steps, mechanism.reads))
                else:
                    segments.append((mechanism.sample_rate, mechanism.steps, mechanism.reads))

        def slot(e: int, probe_rounds: int, lora_rounds: int) -> None:
            if schedule.ncm:
                segments.append((1.0, 1, self.phase_mechanism(NCM, e, 1.0, 1.0).reads))
                return
            probe = self.phase_mechanism(PROBE, e, 1.0, 1.0)
            lora = self.phase_mechanism(LORA, e, 1.0, 1.0)
            segments.extend(
                [
                    (probe.sample_rate, probe_rounds * probe.steps, probe.reads),
                    (lora.sample_rate, lora_rounds * lora.steps, lora.reads),
                ]
            )

        if importance_now:
            importance(experience - 1)
        slot(experience, *schedule.rounds_left_in_slot(within))
        for later in range(experience + 1, self.experiences):
            importance(later - 1)
            slot(later, schedule.probe_rounds, schedule.lora_rounds)
        return _merged(segments), fixed


def site_round(
    runtime: SiteRuntime,
    policy: SitePolicy,
    state: SiteState,
    round_config: Mapping[str, Any],
    noise: NoiseSource | None = None,
    run_id: int | None = None,
    secure: SecureRound | None = None,
) -> RoundResult:
    """Run this site's part of one training round (see the module docstring).

    ``noise``: the randomness of every mechanism; default the OS CSPRNG under
    DP and a seeded source without DP (reproducible baselines; tests may pass
    a seeded source under DP, a deployment never does). ``run_id`` (Flower's):
    within one run a server round is trained at most once, in increasing
    order; a replayed or earlier round is refused. ``secure``: the round's
    secure aggregation (``client/secure_stages.py``), under which the ncm
    release is the distributed one (``client/secure_release.py``), a probe or
    LoRA round is the plain one at the site's own noise level (the client
    app masks its tensors: ``client/secure_update.py``), and the reply
    carries no ``num-examples``. Raises
    :class:`~client.site_budget.SiteBusyError` when another training holds the
    state directory, and :class:`~client.privacy_ledger.LedgerError` for a
    lost or rolled-back ledger.
    """
    config, context = runtime.config, stream_context(runtime)
    context.check_plan(str(round_config.get("experience-plan", "")))
    server_round = int(round_config.get(SERVER_ROUND, 0))
    where = context.schedule.position(server_round)
    sent = str(round_config.get(PHASE, "") or "")
    if sent and sent != where.phase:
        return RoundResult(
            "refused",
            f"the server says phase {sent!r} for round {server_round}, the run config "
            f"gives {where.phase!r}: the site follows the run config and declines this message",
        )
    experience = context.schedule.site_experience(where.slot, runtime.data.index)
    if experience < 0:
        return RoundResult(
            "skipped",
            f"not started: this site joins the stream late and starts experience 0 in slot {where.slot - experience}",
            {"experience": experience},
        )
    if experience >= context.schedule.training_experiences:
        return RoundResult(
            "skipped",
            f"stream finished: this site trained its {context.schedule.training_experiences} experience(s)",
            {"experience": experience},
        )
    if noise is None:
        noise = (
            NoiseSource.secure()
            if policy.dp
            else NoiseSource.seeded(config.seed * 100_003 + server_round * 101 + runtime.data.index)
        )
    plan = SitePlan(runtime, context, policy)
    with open_budget(state, policy) as budget:
        if plan.replay_probability > 0:  # read under the lock: the buffer is the site's state
            plan = dataclasses.replace(plan, buffered=held_groups(state.folder))
        replayed = _replayed_round(state, run_id, server_round)
        if replayed:
            return RoundResult("refused", replayed, {"experience": experience})
        result = _run(
            runtime, plan, budget, state, where.phase, experience, where.round_in_slot, server_round, noise, secure
        )
        if run_id is not None and result.status == "trained":
            write_json_atomic(state.last_round, {"run": int(run_id), "round": server_round})
        return result


def _replayed_round(state: SiteState, run_id: int | None, server_round: int) -> str:
    """The reason to refuse a round this run already trained (or an earlier one), else an empty string."""
    path = state.last_round
    if run_id is None or not path.exists():
        return ""
    last = json.loads(path.read_text(encoding="utf-8"))
    if int(last.get("run", -1)) == int(run_id) and server_round <= int(last.get("round", 0)):
        return (
            f"round {server_round} of run {run_id} comes after round {last['round']} was trained: a site trains "
            "each round of a run once, in order, and declines a replayed one"
        )
    return ""


def _run(
    runtime: SiteRuntime,
    plan: SitePlan,
    budget: SiteBudget,
    state: SiteState,
    phase: str,
    experience: int,
    within: int,
    server_round: int,
    noise: NoiseSource,
    secure: SecureRound | None = None,
) -> RoundResult:
    config, context, policy = runtime.config, plan.context, plan.policy
    ewc = EwcState.load(state.folder, config.ewc_mode, config.ewc_decay) if config.ewc_lambda > 0 else None
    pending = pending_importance(ewc, experience)
    facts: dict[str, float] = {"experience": experience, "num-examples": plan.nominal}
    if secure is not None:  # no per-site size beside a secure sum: the server sees the sum only
        del facts["num-examples"]
    clip = config.max_grad_norm if policy.dp else UNBOUNDED_CLIP
    if phase != NCM and secure is not None:
        try:  # public values only: refused before anything is calibrated, computed or spent
            update_scale(plan.nominal, secure)
        except BitWidthError as err:
            return RoundResult("refused", str(err), facts)
    if policy.dp:
        segments, fixed = plan.remaining(experience, within, pending is not None)
        try:
            if secure is not None and phase == NCM:  # the common level; the site's hint (noise.json) is not used
                sigma = budget.common_noise_multiplier(
                    segments, fixed, fresh_noise_multiplier(policy, segments, fixed, config.noise_multiplier)
                )
            else:
                sigma = budget.noise_multiplier(segments, fixed, proposed=config.noise_multiplier)
        except BudgetError as err:  # nothing left for the remaining plan: the hard stop, not a crash
            return RoundResult(
                "skipped", f"privacy budget: {err}", {**facts, **budget.facts(), "stopped-for-budget": 1}
            )
    else:
        sigma = 0.0
    main = plan.phase_mechanism(phase, experience, sigma, clip)
    classes = context.labels[experience] if not context.schedule.joint else np.arange(len(runtime.data.label_names))
    distributed = None
    if phase == NCM and secure is not None:  # what runs, and so what is priced: the distributed release's entry
        if not policy.dp:
            raise ValueError("secure aggregation carries the sites' DP noise: a site without DP takes no part")
        distributed = distributed_release(sigma, secure.honest_sites, release_dimension(runtime), classes, main.reads)
        try:  # public values only: refused before anything is computed or spent
            check_bit_width(distributed, secure, len(runtime.data.label_names) * distributed.dim)
        except BitWidthError as err:
            return RoundResult("refused", str(err), facts)
        main = distributed.mechanism
    note = plan.full_batch_note(phase, experience) if policy.dp else ""
    if note:  # once per process: the site's own log, never the reply
        runtime.data.note_once(note)
    importance = plan.importance_mechanism(pending, sigma, clip) if pending is not None else None
    mechanisms = [m for m in (importance, main) if m is not None]
    if not budget.can_afford(mechanisms):
        spent = budget.facts().get("epsilon", 0.0)
        return RoundResult(
            "skipped",
            (
                f"privacy budget: epsilon spent {spent:.3f} of {policy.target_epsilon}; this round ({main.steps} steps at "
                f"sample rate {main.sample_rate:.3g}, noise {sigma:.3g}{', plus the EWC importance batches' if importance else ''})"
                f" would reach {budget.epsilon_if(mechanisms):.3f}"
            ),
            {**facts, **budget.facts(), "stopped-for-budget": 1},
        )
    if importance is not None and ewc is not None and pending is not None:
        _consolidate(runtime, context, state, budget, ewc, pending, importance, noise)
        facts["ewc-importance-steps"] = importance.steps
    current = context.train_positions(experience)
    if phase == NCM:
        if distributed is not None and secure is not None:
            release = run_secure_class_sums(runtime, current, distributed, secure)
        else:
            release = run_class_sums(runtime, current, classes, main, noise)
        budget.record(main)
        return RoundResult(
            "trained", "", {**facts, **_settings(main), **budget.facts(), "stopped-for-budget": 0}, release=release
        )
    buffer = (
        absorb_finished(runtime, context, state.folder, experience, plan.replay_probability)
        if plan.replay_probability > 0
        else None
    )
    pool = training_pool(current, buffer)
    if phase == PROBE:
        rows = incremental_rows(runtime, context, experience)
        outcome = run_probe(runtime, pool, main, noise, penalty(runtime, ewc, phase, rows), rows)
    else:
        outcome = run_lora(runtime, pool, main, noise, penalty(runtime, ewc, phase))
    budget.record(main)
    private_values = {"train-loss": outcome.mean_loss, "train-seconds": outcome.seconds}
    if policy.dp:
        log_local_metrics(state, server_round, {"train-loss": outcome.mean_loss, "pool-records": len(pool)})
        private_values = {}
    return RoundResult(
        "trained",
        "",
        {
            **facts,
            **_settings(main),
            **budget.facts(),
            "stopped-for-budget": 0,
            "train-steps": main.steps,
            **private_values,
        },
        weight=plan.nominal,
    )


def _consolidate(
    runtime: SiteRuntime,
    context: StreamContext,
    state: SiteState,
    budget: SiteBudget,
    ewc: EwcState,
    previous: int,
    mechanism: SgdMechanism,
    noise: NoiseSource,
) -> None:
    """Estimate experience ``previous``'s importances, record them in the ledger first, then consolidate and save."""
    estimate = run_importance(
        runtime, context.train_positions(previous), mechanism, noise, lora=context.schedule.lora_rounds > 0
    )
    budget.record(mechanism)
    anchor = anchor_arrays(runtime.adapter.model)  # the received global model: the end of experience `previous`
    importance = seen_rows_only(runtime, context, previous, estimate.importance)
    ewc.consolidate(previous, importance, {name: anchor[name] for name in importance})
    ewc.save(state.folder)
    log(
        INFO,
        "%s: EWC importances of experience %d estimated (%d batches) and consolidated",
        runtime.data.name,
        previous,
        mechanism.steps,
    )


def _settings(mechanism: SgdMechanism) -> dict[str, float]:
    return {
        "noise-multiplier": mechanism.noise_multiplier,
        "sample-rate": mechanism.sample_rate,
        "max-grad-norm": mechanism.max_grad_norm,
    }


def _merged(segments: list[Segment]) -> list[Segment]:
    """One segment per (sample rate, record groups), zero-step ones dropped (composition ignores the order)."""
    steps: dict[tuple, int] = {}
    for rate, count, groups in segments:
        if count > 0:
            steps[(rate, groups)] = steps.get((rate, groups), 0) + count
    return [(rate, count, groups) for (rate, groups), count in steps.items()]
