"""Private local training: DP-SGD with Opacus on the adapter model, or on a linear head over cached features.

The mechanism (both entry points): each step draws a Poisson batch (every
record independently with probability ``sample_rate = expected_batch_size /
records``, Opacus' ``UniformWithReplacementSampler``), computes per-sample
gradients of the trainable parameters with Opacus hooks (``GradSampleModule``),
clips each to ``max_grad_norm``, adds Gaussian noise of std ``noise_multiplier *
max_grad_norm`` and divides by ``expected_batch_size`` (``DPOptimizer``). The
loss is a mean over the batch, and the hooks are told so (``loss_reduction =
"mean"``): with a mismatch the per-sample gradients are off by the batch size.

Opacus is attached for one call only and removed afterwards, leaving the model
exactly as it was (no hooks, no ``grad_sample`` or ``summed_grad`` attributes,
same train/eval modes): the same model object serves every round and every
virtual site of a simulation process. Nothing is accounted here: the caller
records the returned :class:`PrivateOutcome` in the site's privacy ledger.

Randomness: ``seed = None`` (the private default) draws the sampling and noise
generators from the operating system. A fixed seed makes a run reproducible
(tests, benchmarks) but anyone who knows it can regenerate and subtract the
noise, and reusing one seed across rounds repeats the same noise: never ship a
known or repeated seed in a deployment.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from client.local_training import Encoded, trim_padding
from client.privacy_ledger import validate_clip

ExtraGradient = Callable[[dict[str, torch.nn.Parameter]], dict[str, torch.Tensor]]
OPTIMIZERS = ("sgd", "adamw")
LOSS_REDUCTION = "mean"  # the batch loss is a mean; Opacus' hooks and DPOptimizer must be told the same
# What Opacus (hooks, DPOptimizer) may leave on parameters and modules; all removed after each call.
_PARAM_TRACES = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_MODULE_TRACES = ("activations", "max_batch_len", "autograd_grad_sample_hooks", "ft_compute_sample_grad")


@dataclass(frozen=True)
class PrivateOutcome:
    """What one private training call did: the ledger entry and the local diagnostics.

    ``(noise_multiplier, sample_rate, steps)`` is what the privacy ledger must
    record. ``mean_loss`` and ``mean_batch_size`` are computed from private data
    without noise: they are not covered by the DP guarantee.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    expected_batch_size: int
    mean_loss: float
    mean_batch_size: float
    seconds: float


@contextlib.contextmanager
def per_sample_gradient_hooks(model: torch.nn.Module) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Attach Opacus per-sample-gradient hooks to ``model`` for the ``with`` block; remove every trace after.

    Yields the trainable parameters by name (the names of
    ``model.named_parameters()``); after each ``loss.backward()`` on a mean
    loss, ``param.grad_sample[i]`` holds the gradient of example ``i``'s loss.
    The model is in train mode inside the block; on exit its hooks, the Opacus
    attributes and gradients are gone and every module's train/eval mode is
    restored.
    """
    from opacus import GradSampleModule

    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("the model has no trainable parameters; wrap it with LoRA or unfreeze the head first")
    modes = {module: module.training for module in model.modules()}
    full_hook_flags = {module: module._is_full_backward_hook for module in model.modules()}
    hooks = None
    try:
        model.train()
        hooks = GradSampleModule(model, batch_first=True, loss_reduction=LOSS_REDUCTION, strict=True)
        yield named
    finally:
        if hooks is not None:
            hooks.cleanup()
        _scrub(model)
        for module, training in modes.items():
            module.training = training
        for module, flag in full_hook_flags.items():
            module._is_full_backward_hook = flag  # torch keeps it True after the hook is removed


def _scrub(model: torch.nn.Module) -> None:
    """Delete what Opacus leaves behind that its own cleanup misses, and the gradients."""
    for param in model.parameters():
        for name in _PARAM_TRACES:
            if hasattr(param, name):
                delattr(param, name)
        param.grad = None
    for module in model.modules():
        for name in _MODULE_TRACES:
            module.__dict__.pop(name, None)


def train_private(
    model: torch.nn.Module,
    data: Encoded,
    steps: int,
    expected_batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    extra_gradient: ExtraGradient | None = None,
) -> PrivateOutcome:
    """DP-SGD on the trainable parameters (LoRA and head) of a sequence classifier, ``steps`` Poisson batches.

    The loss is the mean cross-entropy of the batch. ``extra_gradient``, if
    given, is called before each optimiser step with the trainable parameters
    by name and returns tensors (by the same names, any subset) that are ADDED
    to their gradients after clipping, noise and averaging: the way to apply a
    regulariser such as EWC, whose term in the loss Opacus would ignore. For
    the release to stay private it must depend only on already-private or
    public values (the global model, noised statistics), not on raw site data.
    """
    _check_count("expected_batch_size", expected_batch_size, upper=len(data), what="records on this site")
    device = _device_of(model)

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        inputs = {name: tensor.to(device) for name, tensor in trim_padding(data.rows(index)).items()}
        logits = model(**inputs).logits
        return F.cross_entropy(logits, data.labels[index].to(device), reduction=LOSS_REDUCTION)

    return _dp_sgd(
        model, batch_loss, len(data), steps, expected_batch_size, learning_rate, noise_multiplier,
        max_grad_norm, seed, optimizer, momentum, extra_gradient,
    )


def train_private_features(
    head: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    expected_batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    extra_gradient: ExtraGradient | None = None,
) -> PrivateOutcome:
    """DP-SGD of a head (e.g. ``torch.nn.Linear``) on cached feature vectors: the private linear-probe phase.

    ``features`` is ``(records, dim)``, ``labels`` ``(records,)`` class indices;
    the loss is mean cross-entropy of ``head(features)``. Same mechanism,
    outcome and ``extra_gradient`` contract as :func:`train_private`.
    """
    if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match; "
            "pass features as (records, dim) and labels as (records,)"
        )
    _check_count("expected_batch_size", expected_batch_size, upper=len(labels), what="records on this site")
    device = _device_of(head)
    labels = labels.long()

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        logits = head(features[index].to(device))
        return F.cross_entropy(logits, labels[index].to(device), reduction=LOSS_REDUCTION)

    return _dp_sgd(
        head, batch_loss, len(labels), steps, expected_batch_size, learning_rate, noise_multiplier,
        max_grad_norm, seed, optimizer, momentum, extra_gradient,
    )


def _dp_sgd(
    module: torch.nn.Module,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    records: int,
    steps: int,
    expected_batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None,
    optimizer: str,
    momentum: float,
    extra_gradient: ExtraGradient | None,
) -> PrivateOutcome:
    """The DP-SGD loop shared by both entry points."""
    _check_settings(steps, learning_rate, noise_multiplier, max_grad_norm, optimizer, momentum)
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    started = time.perf_counter()
    sample_rate = expected_batch_size / records
    sampling, noise = _generators(seed, _device_of(module))
    losses: list[float] = []
    sizes: list[int] = []
    with per_sample_gradient_hooks(module) as named:
        params = list(named.values())
        private = DPOptimizer(
            _base_optimizer(optimizer, params, learning_rate, momentum),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=LOSS_REDUCTION,
            generator=noise,
        )
        batches = UniformWithReplacementSampler(
            num_samples=records, sample_rate=sample_rate, generator=sampling, steps=steps
        )
        for batch in batches:
            private.zero_grad(set_to_none=True)
            index = torch.as_tensor(batch, dtype=torch.long)
            if len(index) == 0:  # Poisson drew nobody: the step is noise only, and still counts
                for param in params:
                    param.grad_sample = param.new_zeros((0, *param.shape))
            else:
                loss = batch_loss(index)
                with warnings.catch_warnings():  # LoRA layers fed by frozen layers: expected, and harmless here
                    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                    loss.backward()
                losses.append(float(loss.detach()))
            sizes.append(len(index))
            private.pre_step()  # clip, accumulate, add noise, divide by the expected batch size
            if extra_gradient is not None:
                _add_extra_gradient(named, extra_gradient(named))
            private.original_optimizer.step()
    return PrivateOutcome(
        noise_multiplier=float(noise_multiplier),
        sample_rate=sample_rate,
        steps=len(sizes),
        max_grad_norm=float(max_grad_norm),
        expected_batch_size=expected_batch_size,
        mean_loss=float(np.mean(losses)) if losses else math.nan,
        mean_batch_size=float(np.mean(sizes)),
        seconds=time.perf_counter() - started,
    )


def _add_extra_gradient(named: dict[str, torch.nn.Parameter], extra: dict[str, torch.Tensor]) -> None:
    """Add the caller's (already private) gradient terms to the noised gradients."""
    unknown = set(extra) - set(named)
    if unknown:
        raise ValueError(
            f"extra_gradient returned unknown parameters {sorted(unknown)[:3]}; "
            "key it by the trainable parameter names it was given"
        )
    with torch.no_grad():
        for name, term in extra.items():
            param = named[name]
            if tuple(term.shape) != tuple(param.shape):
                raise ValueError(
                    f"extra_gradient for {name} has shape {tuple(term.shape)}, the parameter {tuple(param.shape)}; "
                    "return one tensor of the parameter's shape"
                )
            param.grad.add_(term.to(device=param.grad.device, dtype=param.grad.dtype))


def _base_optimizer(name: str, params: list[torch.nn.Parameter], learning_rate: float, momentum: float) -> Any:
    """The optimiser DPOptimizer wraps (fresh each call: no state crosses rounds)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate)
    return torch.optim.SGD(params, lr=learning_rate, momentum=momentum)


def _generators(seed: int | None, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Independent generators for Poisson sampling (CPU, as Opacus' sampler wants) and for the noise."""
    if seed is None:
        sampling_seed, noise_seed = secrets.randbits(63), secrets.randbits(63)
    else:
        sampling_seed, noise_seed = seed, (seed * 0x9E3779B97F4A7C15 + 1) % 2**63
    sampling = torch.Generator().manual_seed(sampling_seed)
    noise = torch.Generator(device=device).manual_seed(noise_seed)
    return sampling, noise


def _device_of(module: torch.nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _check_count(name: str, value: int, upper: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{name} = {value!r}: use a whole number from 1 to {upper} ({what})")


def _check_settings(
    steps: int, learning_rate: float, noise_multiplier: float, max_grad_norm: float, optimizer: str, momentum: float
) -> None:
    """Reject nonsense before any training, with the fix in the message."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps = {steps!r}: use a whole number of at least 1")
    if not learning_rate > 0 or not math.isfinite(learning_rate):
        raise ValueError(f"learning_rate = {learning_rate!r}: use a positive finite learning rate, e.g. 0.5 for SGD")
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        raise ValueError(
            f"noise_multiplier = {noise_multiplier!r}: use a finite value >= 0 (calibrate it from the budget)"
        )
    validate_clip(max_grad_norm)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer = {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum = {momentum!r}: use a value in [0, 1), e.g. 0.9")
