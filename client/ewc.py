"""Elastic weight consolidation over the trainable parameters only, correct under DP-SGD.

EWC (Kirkpatrick et al., PNAS 2017) keeps the parameters that mattered for
past experiences near their values after those experiences: with diagonal
importances ``F`` and anchors ``theta*`` it adds ``lambda/2 * sum F (theta -
theta*)^2`` to the objective, whose gradient is ``lambda * F * (theta -
theta*)``. (Avalanche's ``EWCPlugin`` adds ``ewc_lambda * sum F (theta -
theta*)^2``, without the 1/2: its ``ewc_lambda`` is our ``lambda / 2``.)

Why not Avalanche's plugin: under Opacus a penalty added to the loss is
silently ignored (the DP optimiser builds the update from per-sample gradients
of the data loss), its importance pass crashes under Opacus, and it covers the
frozen base too (182 MB per experience on MiniLM). Here:

- Only parameters with ``requires_grad`` (LoRA factors and the head) get
  importances and anchors; the frozen base never appears.
- :meth:`EwcState.penalty_gradient` returns ``lambda * F * (theta - theta*)``
  per trainable parameter name, to be ADDED TO ``p.grad`` AFTER Opacus has
  clipped, noised and averaged it and before the optimiser steps. That
  gradient depends only on the current parameters and on importances and
  anchors that are themselves DP outputs, so adding it is post-processing and
  costs no privacy.
- Modes (as in Avalanche): ``separate`` keeps one (F, theta*) pair per past
  experience and sums their penalties; ``online`` (Schwarz et al. 2018) keeps
  one pair, ``F = decay * F_old + F_new`` and ``theta*`` = the newest anchor.

Importances under DP, choice (a): estimated from private data INSIDE a
Gaussian mechanism, and counted in the ledger. :func:`estimate_importance`
computes per-sample gradients of the trainable parameters (Opacus hooks,
through DP-SGD's own ``per_sample_gradient_hooks``), clips each to L2 norm ``C`` (jointly over
all trainable tensors, as DP-SGD does), squares them elementwise and sums
over the batch. Adding or removing one record changes that sum by a vector
``g**2`` with ``||g**2||_2 <= ||g||_2**2 <= C**2``, so the L2 sensitivity is
``C**2``; Gaussian noise of std ``noise_multiplier * C**2`` on every batch sum
makes each batch one step of the subsampled Gaussian mechanism with that
noise multiplier and the batch sampler's sample rate: the same kind of step
as DP-SGD's, described by the same :class:`~client.mechanisms.SgdMechanism`
(``max_grad_norm`` is ``C``), so the ledger records the mechanism's
``ledger_entry`` ``(noise_multiplier, sample_rate, steps)`` (also returned
with the estimate) and its epsilon grows by the composition. An empty
Poisson batch still releases noise and still counts as a step. The noise
comes from the round's :class:`~client.secure_noise.NoiseSource`.

Why not (b), post-processing the noisy DP-SGD gradients already released: the
diagonal Fisher needs the per-example second moment ``E[g_i**2]``, but a
released gradient is a batch mean, whose square estimates ``(E g)**2 +
Var(g)/B + (sigma C / B)**2``: the per-example signal is divided by the batch
size and buried under the noise term. With ``d`` = 75k trainable parameters,
clipped norms ``C`` spread over them and B = 64, sigma = 1, the per-coordinate
signal is about ``C**2/(d B)`` = 2e-7 C^2 against noise ``(sigma C/B)**2`` =
2.4e-4 C^2 with a standard deviation of the same size per step: hopeless in
the tens of steps a round has. (a) costs budget but gives importances that
mean something, and its cost is explicit and tunable (few batches, more
noise).

Persistence: importances and anchors of every term go to
``ewc_state.safetensors`` in the site's state folder, atomically.

When to call what (a site, at the first round of experience ``e >= 1``,
with the global model of the end of experience ``e-1`` loaded):
``estimate_importance`` on ``mechanism.steps`` Poisson batches of experience
``e-1``'s training records, record ``mechanism.ledger_entry``, ``state.consolidate(e-1, estimate.importance,
anchor_arrays(model))``, ``state.save(dir)``; then at every DP-SGD step of
experience ``e`` add ``state.penalty_gradient(model, lambda)`` to the noisy
gradients.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.mechanisms import SgdMechanism, Step
from client.state_files import load_arrays, save_arrays
from fedcl.run_config import ConfigError

if TYPE_CHECKING:  # torch is imported lazily here
    from client.secure_noise import NoiseSource

EWC_MODES = ("separate", "online")
EWC_FILE = "ewc_state.safetensors"
_FORMAT = "fedcl-ewc"
_VERSION = 1
_CLIP_EPSILON = 1e-6  # Opacus' clip factor: C / (norm + 1e-6)

Batch = tuple[Any, Any]  # (inputs: Tensor or dict of Tensors, labels: LongTensor)


def trainable_parameters(model: Any) -> dict[str, Any]:
    """The parameters that train (``requires_grad``), by name; unwraps an Opacus GradSampleModule.

    ``model`` may also be a mapping of name to parameter (what DP-SGD's
    ``extra_gradient`` callback receives), so ``functools.partial(state.penalty_gradient,
    ewc_lambda=...)`` is such a callback as is.
    """
    if isinstance(model, Mapping):
        return {name: p for name, p in model.items() if p.requires_grad}
    return {name: p for name, p in _unwrapped(model).named_parameters() if p.requires_grad}


def anchor_arrays(model: Any) -> dict[str, np.ndarray]:
    """A float32 copy of the trainable parameters: the anchor ``theta*`` to consolidate."""
    return {
        name: p.detach().cpu().numpy().astype(np.float32, copy=True) for name, p in trainable_parameters(model).items()
    }


@dataclass(frozen=True)
class ImportanceEstimate:
    """Diagonal importances (>= 0) per trainable parameter name, and what the ledger must record."""

    importance: dict[str, np.ndarray]
    ledger_steps: Step  # the mechanism's ledger entry (noise_multiplier, sample_rate, steps)
    noise_std: float  # std of the noise left in each importance value (0 without noise)


def estimate_importance(
    model: Any,
    batches: Iterable[Batch],
    mechanism: SgdMechanism,
    noise: NoiseSource,
) -> ImportanceEstimate:
    """Run ``mechanism`` as the private diagonal empirical Fisher of the trainable parameters (choice (a) above).

    ``batches`` yields exactly ``mechanism.steps`` ``(inputs, labels)`` batches
    that the caller drew with Poisson sampling at ``mechanism.sample_rate`` (an
    empty batch still counts); a different count raises ValueError, and so does
    ``mechanism.steps = 0`` (there is nothing to estimate from). The model is
    called as ``model(**inputs)`` for a dict, ``model(inputs)`` otherwise; its
    output (or ``.logits``) is the logits, and the loss is cross-entropy. Each
    example's gradient is clipped to ``mechanism.max_grad_norm``, squared and
    summed; every batch sum gets Gaussian noise of std ``noise_multiplier *
    max_grad_norm**2`` from ``noise``; the total is divided by
    ``mechanism.expected_batch_size * mechanism.steps`` (public constants) and
    clamped at 0. A non-private mechanism (``noise_multiplier = 0`` with
    ``UNBOUNDED_CLIP``) gives the plain estimate. Batches run on the model's
    device (each is moved there); the clipped squares are summed there and
    the float64 totals, their noise and the importances stay on the CPU,
    so the noise is the same draw on every device. Only the layers that own
    trainable parameters run in train mode (Opacus' hooks need it);
    everything else, dropout included, runs in eval mode, so the estimate is
    deterministic. The per-sample gradients come from
    :func:`client.dp_training.per_sample_gradient_hooks` (the same hooks as
    DP-SGD), which restores every module's mode and removes every Opacus
    trace and ``.grad`` afterwards; pass the plain model, not one an Opacus
    GradSampleModule currently wraps.
    """
    _check_estimate_args(model, mechanism, noise)
    import torch

    from client.device import module_device, to_device
    from client.dp_training import fixed_batch_size, padded_batch, per_sample_gradient_hooks

    device = module_device(model)
    clip = mechanism.max_grad_norm
    noise_std = mechanism.noise_multiplier * clip**2
    steps = 0
    with per_sample_gradient_hooks(model) as params:  # restores modes and removes every Opacus trace on exit
        _dropout_off(model)
        totals = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in params.items()}
        for inputs, labels in batches:
            steps += 1
            if steps > mechanism.steps:
                break
            real = len(labels)
            if mechanism.private:  # as DP-SGD: a fixed public batch, so the time does not show the draw
                inputs, labels = padded_batch(inputs, labels, fixed_batch_size(mechanism))
            inputs = to_device(inputs, device) if isinstance(inputs, Mapping) else inputs.to(device)
            labels = labels.to(device)
            if len(labels) > 0:
                _add_clipped_squares(model, params, totals, inputs, labels, clip, real)
            for total in totals.values():
                total += noise.gaussian(total.shape, noise_std, "cpu", torch.float64)
    if steps != mechanism.steps:
        raise ValueError(
            f"{'more than ' + str(mechanism.steps) if steps > mechanism.steps else steps} batches for a mechanism "
            f"of {mechanism.steps} steps; draw exactly mechanism.steps Poisson batches at mechanism.sample_rate"
        )
    expected = mechanism.expected_batch_size * mechanism.steps
    importance = {name: (total / expected).clamp(min=0.0).to(torch.float32).numpy() for name, total in totals.items()}
    return ImportanceEstimate(importance, mechanism.ledger_entry, noise_std * math.sqrt(steps) / expected)


@dataclass
class EwcState:
    """Importances and anchors of past experiences, with the penalty gradient they imply.

    ``terms`` holds one ``(importance, anchor)`` pair per past experience
    (``separate``) or a single decayed pair (``online``).
    """

    mode: str = "separate"
    decay: float = 1.0
    importances: list[dict[str, np.ndarray]] = field(default_factory=list)
    anchors: list[dict[str, np.ndarray]] = field(default_factory=list)
    experiences: list[int] = field(default_factory=list)
    _cache: dict[tuple, dict[str, list]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_ewc_settings(self.mode, self.decay)

    def consolidate(
        self, experience: int, importance: Mapping[str, np.ndarray], anchor: Mapping[str, np.ndarray]
    ) -> bool:
        """Add experience ``experience``'s importances and anchor; returns False if it was already added.

        ``separate``: a new term. ``online``: ``F = decay * F_old + F_new`` and
        the anchor becomes the new one (Avalanche's ``update_importances``).
        """
        if experience in self.experiences:
            return False
        importance = {k: np.asarray(v, dtype=np.float32) for k, v in importance.items()}
        anchor = {k: np.asarray(v, dtype=np.float32) for k, v in anchor.items()}
        _check_term(importance, anchor)
        if self.mode == "online" and self.importances:
            old = self.importances[0]
            merged = {k: (self.decay * old[k] if k in old else 0.0) + v for k, v in importance.items()}
            self.importances, self.anchors = [merged], [anchor]
        else:
            self.importances.append(importance)
            self.anchors.append(anchor)
        self.experiences.append(int(experience))
        self._cache.clear()
        return True

    def penalty_gradient(self, model: Any, ewc_lambda: float) -> dict[str, Any]:
        """``lambda * sum_terms F * (theta - theta*)`` for every trainable parameter with an importance.

        ``model`` is the model or its trainable parameters by name. Keyed by
        parameter name (as in :func:`trainable_parameters`), same dtype and
        device as the parameter; empty before the first consolidation or with
        ``ewc_lambda = 0``. Add it to ``p.grad`` after Opacus' clipping and
        noise (DP-SGD's ``extra_gradient`` hook does).
        """
        import torch

        if ewc_lambda < 0 or not math.isfinite(ewc_lambda):
            raise ValueError(f"ewc lambda {ewc_lambda!r}: use a finite value >= 0")
        params = trainable_parameters(model)
        if not self.importances or ewc_lambda == 0:
            return {}
        terms = self._terms_on(params)
        with torch.no_grad():
            return {
                name: ewc_lambda * sum(f * (p - a) for f, a in terms[name])
                for name, p in params.items()
                if name in terms
            }

    def penalty(self, model: Any, ewc_lambda: float) -> float:
        """The penalty ``lambda/2 * sum_terms sum F (theta - theta*)**2`` (for logging)."""
        import torch

        params = trainable_parameters(model)
        if not self.importances:
            return 0.0
        terms = self._terms_on(params)
        with torch.no_grad():
            total = sum(float((f * (params[name] - a) ** 2).sum()) for name in terms for f, a in terms[name])
        return 0.5 * ewc_lambda * total

    def save(self, state_dir: str | os.PathLike[str]) -> Path:
        """Write importances and anchors to ``state_dir/ewc_state.safetensors`` atomically; returns the path."""
        arrays: dict[str, np.ndarray] = {}
        for number, (importance, anchor) in enumerate(zip(self.importances, self.anchors)):
            arrays.update({f"term.{number}.importance.{k}": v for k, v in importance.items()})
            arrays.update({f"term.{number}.anchor.{k}": v for k, v in anchor.items()})
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "mode": self.mode,
            "decay": self.decay,
            "experiences": self.experiences,
            "terms": len(self.importances),
        }
        path = Path(state_dir) / EWC_FILE
        save_arrays(path, arrays, {"fedcl": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str], mode: str, decay: float) -> EwcState:
        """The state saved in ``state_dir``, or an empty one; ``ValueError`` if saved with another mode/decay."""
        path = Path(state_dir) / EWC_FILE
        if not path.exists():
            return cls(mode, decay)
        arrays, raw = load_arrays(path)
        meta = json.loads(raw.get("fedcl", "{}"))
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise ValueError(f"{path} is not a fedcl EWC state (version {_VERSION}); delete it to start afresh")
        if (meta["mode"], meta["decay"]) != (mode, decay):
            raise ValueError(
                f"{path} was built with ewc-mode {meta['mode']!r}, ewc-decay {meta['decay']}; this run asks for "
                f"{mode!r}, {decay}: restore those settings or delete the file"
            )
        state = cls(mode, decay, experiences=[int(e) for e in meta["experiences"]])
        for number in range(int(meta["terms"])):
            for kind, target in (("importance", state.importances), ("anchor", state.anchors)):
                prefix = f"term.{number}.{kind}."
                target.append({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        return state

    def _terms_on(self, params: Mapping[str, Any]) -> dict[str, list]:
        """Per parameter name, the (F, theta*) tensors of every term, on the parameter's device and dtype."""
        import torch

        unknown = sorted({k for term in self.importances for k in term} - set(params))
        if unknown:
            raise ValueError(
                f"EWC state holds {unknown[:3]} ({len(unknown)} names) that are not trainable parameters of this "
                "model; the model or LoRA settings changed since it was saved: restore them or delete ewc_state"
            )
        key = tuple((name, p.device, p.dtype) for name, p in params.items())
        if key not in self._cache:
            self._cache.clear()
            terms: dict[str, list] = {}
            for importance, anchor in zip(self.importances, self.anchors):
                for name, value in importance.items():
                    p = params[name]
                    if tuple(value.shape) != tuple(p.shape):
                        raise ValueError(
                            f"EWC importance for {name} has shape {value.shape}, the model {tuple(p.shape)}"
                        )
                    terms.setdefault(name, []).append(
                        (
                            torch.as_tensor(value, dtype=p.dtype, device=p.device),
                            torch.as_tensor(anchor[name], dtype=p.dtype, device=p.device),
                        )
                    )
            self._cache[key] = terms
        return self._cache[key]


def check_ewc_settings(mode: str, decay: float) -> None:
    """Reject an unknown EWC mode or a decay outside (0, 1]."""
    if mode not in EWC_MODES:
        raise ConfigError(f"config key 'ewc-mode' = {mode!r}: use one of {', '.join(EWC_MODES)}")
    if not (isinstance(decay, (int, float)) and 0.0 < decay <= 1.0):
        raise ConfigError(f"config key 'ewc-decay' = {decay!r}: use a value in (0, 1] (1 = no decay)")


def _unwrapped(model: Any) -> Any:
    """The module an Opacus GradSampleModule wraps (names without the ``_module.`` prefix), else ``model``."""
    if any(cls.__name__ == "GradSampleModule" for cls in type(model).__mro__) and hasattr(model, "_module"):
        return model._module
    return model


def _check_estimate_args(model: Any, mechanism: SgdMechanism, noise: Any) -> None:
    if _unwrapped(model) is not model:
        raise ValueError("pass the plain model, not an Opacus GradSampleModule (use its ._module)")
    if not isinstance(mechanism, SgdMechanism):
        raise ValueError(f"mechanism {mechanism!r}: pass the client.mechanisms.SgdMechanism the site's budget priced")
    if mechanism.steps < 1:
        raise ValueError("a mechanism of 0 steps estimates nothing; skip the importance pass or price >= 1 step")
    from client.secure_noise import NoiseSource

    if not isinstance(noise, NoiseSource):
        raise ValueError(
            f"noise {noise!r}: pass a client.secure_noise.NoiseSource (NoiseSource.secure() in a deployment)"
        )


def _dropout_off(model: Any) -> None:
    """Eval mode everywhere except the layers that own trainable parameters (Opacus hooks need train mode)."""
    model.eval()
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.training = True


def _add_clipped_squares(
    model: Any,
    params: Mapping[str, Any],
    totals: dict[str, Any],
    inputs: Any,
    labels: Any,
    clip_norm: float,
    real: int,
) -> None:
    """One batch: per-sample gradients, clipped jointly to ``clip_norm``, squared, summed into ``totals``.

    Only the first ``real`` rows count; the rest are padding (their terms are zeroed).
    """
    import warnings

    import torch

    for p in params.values():
        p.grad, p.grad_sample = None, None  # no accumulation across batches
    output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    loss = torch.nn.functional.cross_entropy(getattr(output, "logits", output), labels)  # a mean, as the hooks expect
    with warnings.catch_warnings():  # LoRA layers fed by frozen layers: expected, and harmless here
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        loss.backward()
    samples = {
        name: torch.zeros((len(labels), *p.shape), dtype=torch.float64, device=p.device)
        if p.grad_sample is None
        else p.grad_sample.detach().to(torch.float64)
        for name, p in params.items()
    }
    norms = torch.sqrt(sum(g.reshape(len(labels), -1).pow(2).sum(dim=1) for g in samples.values()))
    factor = (clip_norm / (norms + _CLIP_EPSILON)).clamp(max=1.0)
    factor[real:] = 0.0  # padding rows contribute nothing
    for name, g in samples.items():  # summed on the device, added to the CPU total
        totals[name] += (g * factor.view(-1, *([1] * (g.dim() - 1)))).pow(2).sum(dim=0).to(totals[name].device)


def _check_term(importance: Mapping[str, np.ndarray], anchor: Mapping[str, np.ndarray]) -> None:
    if set(importance) != set(anchor):
        raise ValueError("importance and anchor must name the same parameters; take both from the same model")
    for name, value in importance.items():
        if value.shape != anchor[name].shape:
            raise ValueError(f"importance {name} has shape {value.shape}, its anchor {anchor[name].shape}")
        if not np.all(np.isfinite(value)) or np.any(value < 0):
            raise ValueError(f"importance {name} has negative or non-finite values; importances must be >= 0")
