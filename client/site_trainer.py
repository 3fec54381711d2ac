"""One site's training round: the recipe phase, DP-SGD, the ledger and the hard stop.

The private recipe (``recipe = "probe-then-lora"``):
1. probe phase: the base model and the adapter stay frozen (LoRA B = 0, so the
   adapter is the identity); the site embeds its training split once and trains
   only the zero-initialised head on the cached head inputs with DP-SGD. Each
   step costs milliseconds and the head has 1,925 parameters (MiniLM, 5
   labels), so the noise stays small against the clipped signal.
2. LoRA phase: LoRA and head train together with DP-SGD, starting from the
   private probe's head.
Both phases spend one ledger. The noise multiplier is calibrated once for the
whole remaining plan (client/noise_plan.py), or fixed by ``noise-multiplier``.

Every round, before training, the site reloads its ledger from its state
directory; a round that would take it past ``target-epsilon`` is not trained
(the hard stop). After training the new steps are recorded and the ledger is
written atomically before the reply leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from client.dp_training import train_private, train_private_features
from client.head_features import adapter_fingerprint, head_inputs, head_module
from client.local_training import train_plain
from client.noise_plan import Segment, load_or_calibrate
from client.privacy_ledger import BudgetError, LedgerError, PrivacyLedger
from client.site_runtime import SiteRuntime
from client.site_state import SiteState

PROBE, LORA = "probe", "lora"
UNBOUNDED_CLIP = 1e9  # non-private probe: the same code path with no clipping and no noise
PROBE_MOMENTUM = 0.9


@dataclass(frozen=True)
class RoundInstructions:
    """What the server says about this round: its number, phase and the rounds still planned."""

    server_round: int
    phase: str
    probe_rounds_left: int  # including this round when it is a probe round
    lora_rounds_left: int

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> RoundInstructions:
        """Parse the server's round config record."""
        return cls(int(record.get("server-round", 0)), str(record.get("phase", LORA)),
                   int(record.get("plan-probe-rounds", 0)), int(record.get("plan-lora-rounds", 1)))


@dataclass
class RoundResult:
    """The outcome the client app turns into a reply."""

    status: str  # "trained" or "skipped"
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


_FEATURES: dict[tuple, tuple[Any, Any, str, torch.Tensor]] = {}


def cached_head_inputs(runtime: SiteRuntime, split: str) -> torch.Tensor:
    """The head inputs of a split under the current adapter; recomputed only when the LoRA tensors change.

    One entry per site and split is kept (the latest adapter). The entry holds
    the site's data and model objects themselves and is reused only for those
    very objects (identity, not ``id()``, which Python reuses after a free), so
    a new split or model never meets stale vectors.
    """
    key = (runtime.data.name, split)
    fingerprint = adapter_fingerprint(runtime.adapter.model)
    cached = _FEATURES.get(key)
    if cached is None or cached[0] is not runtime.data or cached[1] is not runtime.adapter or cached[2] != fingerprint:
        data = runtime.data.train if split == "train" else runtime.data.test
        cached = (runtime.data, runtime.adapter, fingerprint,
                  head_inputs(runtime.adapter.model, data, runtime.config.eval_batch_size))
        _FEATURES[key] = cached
    return cached[3]


def planned_segments(runtime: SiteRuntime, instructions: RoundInstructions) -> list[Segment]:
    """The DP steps the site still plans, as (sample rate, steps) segments, this round first."""
    config, records = runtime.config, len(runtime.data.train)
    segments = []
    if instructions.probe_rounds_left:
        segments.append((min(1.0, config.probe_batch_size / records), instructions.probe_rounds_left * config.probe_steps))
    if instructions.lora_rounds_left:
        segments.append((min(1.0, config.batch_size / records), instructions.lora_rounds_left * config.local_steps))
    return segments


def train_round(runtime: SiteRuntime, instructions: RoundInstructions, state: SiteState) -> RoundResult:
    """Train one round of the given phase, privately unless ``dp = false``."""
    config = runtime.config
    if not config.dp:
        return _train(runtime, instructions, noise_multiplier=0.0, max_grad_norm=UNBOUNDED_CLIP, private=False)
    ledger = open_ledger(state, config)
    segments = planned_segments(runtime, instructions)
    sample_rate = segments[0][0]  # this round's phase comes first in the plan
    steps = config.probe_steps if instructions.phase == PROBE else config.local_steps  # this round only
    if config.noise_multiplier > 0:
        sigma = config.noise_multiplier
    else:
        try:
            sigma = load_or_calibrate(state.noise_plan, ledger, segments).noise_multiplier
        except BudgetError as err:  # nothing left for the remaining plan: the hard stop, not a crash
            spent = ledger.epsilon()
            return RoundResult("skipped", f"privacy budget: epsilon spent {spent:.3f} of {config.target_epsilon}; {err}",
                               {"epsilon": spent, "stopped-for-budget": 1,
                                **_privacy_metrics(ledger, 0.0, sample_rate, config)})
    if not ledger.can_afford(sigma, sample_rate, steps):
        spent = ledger.epsilon()
        return RoundResult("skipped", (
            f"privacy budget: epsilon spent {spent:.3f} of {config.target_epsilon}; this round "
            f"({steps} steps at sample rate {sample_rate:.3g}, noise {sigma:.3g}) would reach "
            f"{ledger.epsilon_if(sigma, sample_rate, steps):.3f}"),
            {"epsilon": spent, "stopped-for-budget": 1, **_privacy_metrics(ledger, sigma, sample_rate, config)})
    result = _train(runtime, instructions, noise_multiplier=sigma, max_grad_norm=config.max_grad_norm, private=True)
    ledger.record(sigma, result.metrics.pop("sample-rate"), int(result.metrics["train-steps"]))
    ledger.save(state.ledger)
    result.metrics.update({"epsilon": ledger.epsilon(), "stopped-for-budget": 0,
                           **_privacy_metrics(ledger, sigma, sample_rate, config)})
    return result


def budget_stop(ledger: PrivacyLedger, err: BudgetError, facts: dict[str, Any]) -> RoundResult:
    """The hard stop when no noise level fits the remaining plan: skip the round with the reason, not crash."""
    return RoundResult("skipped", f"privacy budget: {err}",
                       {**facts, "epsilon": ledger.epsilon(), "stopped-for-budget": 1})


def open_ledger(state: SiteState, config: Any) -> PrivacyLedger:
    """Load the site's ledger from disk (never from memory); create it only for a site that never trained.

    A site that has a noise plan but no ledger has lost its ledger: it refuses
    to train rather than start again from zero. A new ledger is written at once,
    before any other state, so that this check holds after any crash.
    """
    if not state.ledger.exists():
        if state.noise_plan.exists():
            raise LedgerError(
                f"privacy ledger {state.ledger} is missing but {state.noise_plan} shows the site has trained; "
                "restore the state directory from its backup (a site must never restart its budget from zero)")
        ledger = PrivacyLedger(target_epsilon=config.target_epsilon, delta=config.delta, accountant=config.accountant)
        ledger.save(state.ledger)
        return ledger
    return PrivacyLedger.load(state.ledger, target_epsilon=config.target_epsilon, delta=config.delta,
                              accountant=config.accountant)


def _privacy_metrics(ledger: PrivacyLedger, sigma: float, sample_rate: float, config: Any) -> dict[str, float]:
    return {"delta": config.delta, "noise-multiplier": sigma, "max-grad-norm": config.max_grad_norm,
            "dp-steps-total": ledger.total_steps, "sample-rate": sample_rate}


def _train(runtime: SiteRuntime, instructions: RoundInstructions, noise_multiplier: float, max_grad_norm: float,
           private: bool) -> RoundResult:
    config, data = runtime.config, runtime.data
    seed = None if private else config.seed * 100_003 + instructions.server_round * 101 + data.index
    if instructions.phase == PROBE:
        features = cached_head_inputs(runtime, "train")
        outcome = train_private_features(
            head_module(runtime.adapter.model), features, data.train.labels, config.probe_steps,
            min(config.probe_batch_size, len(data.train)), config.probe_learning_rate, noise_multiplier,
            max_grad_norm, seed, optimizer="sgd", momentum=PROBE_MOMENTUM)
    elif private:
        outcome = train_private(
            runtime.adapter.model, data.train, config.local_steps, min(config.batch_size, len(data.train)),
            config.learning_rate, noise_multiplier, max_grad_norm, seed, optimizer="sgd", momentum=PROBE_MOMENTUM)
    else:
        plain = train_plain(runtime.adapter.model, data.train, config.local_steps, config.batch_size,
                            config.learning_rate, seed=seed)
        return RoundResult("trained", "", {"train-loss": plain.mean_loss, "train-steps": plain.steps,
                                           "train-seconds": plain.seconds, "sample-rate": 0.0})
    return RoundResult("trained", "", {"train-loss": outcome.mean_loss, "train-steps": outcome.steps,
                                       "train-seconds": outcome.seconds, "sample-rate": outcome.sample_rate})
