"""Private local training: DP-SGD with Opacus on the adapter model, or on a linear head over cached features.

Both entry points run exactly the :class:`~client.mechanisms.SgdMechanism`
the site's budget priced, nothing recomputed: ``mechanism.steps`` steps, each
drawing a Poisson batch (every record independently with probability
``mechanism.sample_rate``, over however many records are passed, none
included), computing per-sample gradients of the trainable parameters with
Opacus hooks (``GradSampleModule``), clipping each to
``mechanism.max_grad_norm``, adding Gaussian noise of std ``noise_multiplier *
max_grad_norm`` to the clipped sum and dividing by
``mechanism.expected_batch_size`` (a public constant, not the record count)
(:func:`sourced_dp_optimizer`, Opacus' ``DPOptimizer`` with the noise drawn
from the round's :class:`~client.secure_noise.NoiseSource`). The loss is a
mean over the batch, and the hooks are told so (``loss_reduction = "mean"``):
with a mismatch the per-sample gradients are off by the batch size.

Both the batch membership and the noise come from the ``NoiseSource``:
:meth:`~client.secure_noise.NoiseSource.secure` in a deployment,
:meth:`~client.secure_noise.NoiseSource.seeded` in tests and benchmarks.

Fixed shapes under privacy: a private mechanism runs every batch at the full
padded length (no trimming of padding columns) and pads every Poisson batch
with dummy rows to a public size (:func:`fixed_batch_size`; their per-example
gradients are zeroed before clipping, so the update is the same), so a
step's compute does not depend on how long the batch's records are nor on how
many were drawn (a site's reply timing is visible to the server). The loss
the hooks see is the mean over every row computed. A non-private mechanism
trims and does not pad, as plain training does.

Devices: everything runs on the device of the trained module's parameters
(:func:`client.device.module_device`): each batch (and its dummy rows) is
moved there per step, the noise is drawn on the CPU and moved there
(:meth:`~client.secure_noise.NoiseSource.gaussian`: the same numbers on
every device), the loss diagnostic comes back to the host once at the end.
Always float32, no autocast: per-sample gradients, their norms and the
clipping run in the parameters' own precision, so the sensitivity bound
the accountant relies on holds as computed.

Opacus is attached for one call only and removed afterwards, leaving the model
exactly as it was (no hooks, no ``grad_sample`` or ``summed_grad`` attributes,
same train/eval modes): the same model object serves every round and every
virtual site of a simulation process. Nothing is accounted here: the caller
records ``mechanism.ledger_entry`` in the site's privacy ledger.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from client.device import module_device, to_device
from client.local_training import Encoded, trim_padding
from client.mechanisms import SgdMechanism
from client.secure_noise import NoiseSource

ExtraGradient = Callable[[dict[str, torch.nn.Parameter]], dict[str, torch.Tensor]]
OPTIMIZERS = ("sgd", "adamw")
LOSS_REDUCTION = "mean"  # the batch loss is a mean; Opacus' hooks and DPOptimizer must be told the same
PROCESSED_FLAG = "_processed"  # the attribute Opacus marks a used grad_sample/summed_grad with (see add_noise)
# What Opacus (hooks, DPOptimizer) may leave on parameters and modules; all removed after each call.
_PARAM_TRACES = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_MODULE_TRACES = ("activations", "max_batch_len", "autograd_grad_sample_hooks", "ft_compute_sample_grad")


@dataclass(frozen=True)
class PrivateOutcome:
    """What one private training call did: the mechanism's settings and the local diagnostics.

    The caller records ``mechanism.ledger_entry`` in the privacy ledger, not
    this object. ``mean_loss`` and ``mean_batch_size`` are computed from
    private data without noise: they are not covered by the DP guarantee and
    must not leave the site.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    expected_batch_size: float
    mean_loss: float
    mean_batch_size: float
    seconds: float


def sourced_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise: NoiseSource,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    loss_reduction: str = LOSS_REDUCTION,
) -> Any:
    """Opacus' ``DPOptimizer`` over ``optimizer`` (clipping, accumulation, scaling unchanged), noise from ``noise``.

    Only ``add_noise`` differs: the Gaussian of std ``noise_multiplier *
    max_grad_norm`` comes from ``noise.gaussian`` (OS CSPRNG and Opacus'
    secure_mode summing when the source is secure) instead of a torch
    generator. Opacus' processed-flag checks are kept: a ``summed_grad`` that
    already received noise is refused until ``zero_grad``. The class is built
    on first use: importing Opacus configures the root logger, which merely
    importing this module must not do.
    """
    return _sourced_class()(
        optimizer,
        noise=noise,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction=loss_reduction,
    )


@functools.lru_cache(maxsize=1)
def _sourced_class() -> type:
    from opacus.optimizers import DPOptimizer

    class SourcedDPOptimizer(DPOptimizer):
        """``DPOptimizer`` whose ``add_noise`` draws from a NoiseSource (see :func:`sourced_dp_optimizer`)."""

        def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            *,
            noise: NoiseSource,
            noise_multiplier: float,
            max_grad_norm: float,
            expected_batch_size: float,
            loss_reduction: str,
        ) -> None:
            super().__init__(
                optimizer,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size,
                loss_reduction=loss_reduction,
            )
            self.noise = noise

        def add_noise(self) -> None:
            """Add the noise to each clipped sum and store it in ``p.grad`` (as ``DPOptimizer.add_noise``)."""
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                if hasattr(p.summed_grad, PROCESSED_FLAG):
                    raise ValueError(
                        "Gradients haven't been cleared since the last optimizer step; call zero_grad() before each "
                        "step, or the same clipped sum would be released twice"
                    )
                noise = self.noise.gaussian(p.summed_grad.shape, std, p.summed_grad.device, p.summed_grad.dtype)
                p.grad = (p.summed_grad + noise).view_as(p)
                setattr(p.summed_grad, PROCESSED_FLAG, True)

    return SourcedDPOptimizer


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
    mechanism: SgdMechanism,
    learning_rate: float,
    noise: NoiseSource,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    extra_gradient: ExtraGradient | None = None,
) -> PrivateOutcome:
    """Run ``mechanism`` as DP-SGD on the trainable parameters (LoRA and head) of a sequence classifier.

    Exactly ``mechanism.steps`` steps of Poisson batches at
    ``mechanism.sample_rate`` over the records of ``data`` (zero records is
    allowed: every step is then noise only, and still counts); the update of
    each step is (clipped sum + noise) / ``mechanism.expected_batch_size``.
    ``mechanism.steps = 0`` changes nothing and returns ``steps = 0``. The loss
    is the mean cross-entropy of the batch; a private mechanism feeds every
    batch at the full padded length (see the module docstring). All draws come
    from ``noise``. ``extra_gradient``, if given, is called before each
    optimiser step with the trainable parameters by name and returns tensors
    (by the same names, any subset) that are ADDED to their gradients after
    clipping, noise and averaging: the way to apply a regulariser such as EWC,
    whose term in the loss Opacus would ignore. For the release to stay
    private it must depend only on already-private or public values (the
    global model, noised statistics), not on raw site data. Raises ValueError
    for settings that make no sense, before any training.
    """
    _check_settings(mechanism, learning_rate, noise, optimizer, momentum)
    device = module_device(model)  # the records stay where they are; each batch moves to the model's device
    fixed_shape = mechanism.private

    def row_losses(index: torch.Tensor, size: int) -> torch.Tensor:
        rows, target = padded_batch(data.rows(index), data.labels[index], size)
        inputs = to_device(rows if fixed_shape else trim_padding(rows), device)
        return F.cross_entropy(model(**inputs).logits, target.to(device), reduction="none")

    return _dp_sgd(model, row_losses, len(data), mechanism, learning_rate, noise, optimizer, momentum, extra_gradient)


def train_private_features(
    head: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    mechanism: SgdMechanism,
    learning_rate: float,
    noise: NoiseSource,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    extra_gradient: ExtraGradient | None = None,
) -> PrivateOutcome:
    """Run ``mechanism`` as DP-SGD of a head (e.g. ``torch.nn.Linear``) on cached feature vectors (the linear probe).

    ``features`` is ``(records, dim)``, ``labels`` ``(records,)`` class indices
    (``records = 0`` allowed); the loss is mean cross-entropy of
    ``head(features)``. Same mechanism, outcome, noise and ``extra_gradient``
    contract as :func:`train_private`.
    """
    if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match; "
            "pass features as (records, dim) and labels as (records,)"
        )
    _check_settings(mechanism, learning_rate, noise, optimizer, momentum)
    device = module_device(head)
    features, labels = features.to(device), labels.to(device).long()  # once: the cached features are small

    def row_losses(index: torch.Tensor, size: int) -> torch.Tensor:
        batch, target = padded_batch(features[index.to(device)], labels[index.to(device)], size)
        return F.cross_entropy(head(batch), target, reduction="none")

    return _dp_sgd(head, row_losses, len(labels), mechanism, learning_rate, noise, optimizer, momentum, extra_gradient)


def fixed_batch_size(mechanism: SgdMechanism) -> int:
    """The rows every private step computes: the expected batch plus 4 standard deviations of the Poisson draw.

    A private step pads its Poisson batch with dummy rows (their per-example
    gradients are zeroed before clipping, so the update is unchanged) to this
    public size, so its compute, and the reply's timing, does not show how
    many records were drawn; a draw above it (probability about 3e-5 per
    step) is computed as it is. Non-private steps are not padded.
    """
    expected = mechanism.expected_batch_size
    return math.ceil(expected + 4.0 * math.sqrt(expected * (1.0 - mechanism.sample_rate))) + 1


def padded_batch(inputs: Any, labels: torch.Tensor, size: int) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` with dummy rows appended up to ``size`` rows (none if it already has that many).

    Dummies are all-zero feature rows (a tensor batch) or full-length rows of
    padding tokens with an attention mask of ones (a dict of token tensors),
    labelled 0: the same compute as a real row. The caller zeroes their
    per-example gradients (they are the rows from ``len(labels)`` on).
    """
    dummies = max(size - len(labels), 0)
    if not dummies:
        return inputs, labels
    if isinstance(inputs, dict):
        padded = {
            name: torch.cat([tensor, _dummy_token_rows(name, tensor, dummies)]) for name, tensor in inputs.items()
        }
    else:
        padded = torch.cat([inputs, inputs.new_zeros((dummies, *inputs.shape[1:]))])
    return padded, torch.cat([labels, labels.new_zeros(dummies)])


def _dummy_token_rows(name: str, like: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows shaped as ``like``'s: padding ids, an attention mask of ones (full-length compute)."""
    fill = 1 if name == "attention_mask" else 0
    return torch.full((count, *like.shape[1:]), fill, dtype=like.dtype, device=like.device)


def _dp_sgd(
    module: torch.nn.Module,
    row_losses: Callable[[torch.Tensor, int], torch.Tensor],  # (batch, rows padded up to) -> per-row losses
    records: int,
    mechanism: SgdMechanism,
    learning_rate: float,
    noise: NoiseSource,
    optimizer: str,
    momentum: float,
    extra_gradient: ExtraGradient | None,
) -> PrivateOutcome:
    """The DP-SGD loop shared by both entry points (settings already checked): exactly ``mechanism.steps`` batches."""
    started = time.perf_counter()
    losses: list[torch.Tensor] = []  # kept on the device: one host copy at the end, not a sync per step
    sizes: list[int] = []
    if mechanism.steps > 0:
        with per_sample_gradient_hooks(module) as named:
            params = list(named.values())
            private = sourced_dp_optimizer(
                _base_optimizer(optimizer, params, learning_rate, momentum),
                noise=noise,
                noise_multiplier=mechanism.noise_multiplier,
                max_grad_norm=mechanism.max_grad_norm,
                expected_batch_size=mechanism.expected_batch_size,
            )
            padded = fixed_batch_size(mechanism) if mechanism.private else 0
            for _ in range(mechanism.steps):
                index = noise.poisson(records, mechanism.sample_rate)
                dummies = max(padded - len(index), 0)
                private.zero_grad(set_to_none=True)
                if len(index) + dummies == 0:  # non-private, Poisson drew nobody: nothing to compute, the step counts
                    for param in params:
                        param.grad_sample = param.new_zeros((0, *param.shape))
                else:
                    per_row = row_losses(index, padded)
                    with warnings.catch_warnings():  # LoRA layers fed by frozen layers: expected, and harmless here
                        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                        per_row.mean().backward()  # a mean over every row computed: LOSS_REDUCTION for the hooks
                    if dummies:
                        for param in params:  # dummy rows contribute nothing: zero before clipping and summing
                            param.grad_sample[len(index) :] = 0
                    if len(index):
                        losses.append(per_row[: len(index)].detach().mean())
                sizes.append(len(index))
                private.pre_step()  # clip, accumulate, add noise, divide by the expected batch size
                if extra_gradient is not None:
                    _add_extra_gradient(named, extra_gradient(named))
                private.original_optimizer.step()
    return PrivateOutcome(
        noise_multiplier=float(mechanism.noise_multiplier),
        sample_rate=float(mechanism.sample_rate),
        steps=len(sizes),
        max_grad_norm=float(mechanism.max_grad_norm),
        expected_batch_size=float(mechanism.expected_batch_size),
        mean_loss=float(np.mean(torch.stack(losses).cpu().double().numpy())) if losses else math.nan,
        mean_batch_size=float(np.mean(sizes)) if sizes else math.nan,
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


def _check_settings(
    mechanism: SgdMechanism, learning_rate: float, noise: NoiseSource, optimizer: str, momentum: float
) -> None:
    """Reject nonsense before any training, with the fix in the message (the mechanism checks itself)."""
    if not isinstance(mechanism, SgdMechanism):
        raise ValueError(f"mechanism {mechanism!r}: pass the client.mechanisms.SgdMechanism the site's budget priced")
    if not isinstance(noise, NoiseSource):
        raise ValueError(
            f"noise {noise!r}: pass a client.secure_noise.NoiseSource (NoiseSource.secure() in a deployment)"
        )
    if not learning_rate > 0 or not math.isfinite(learning_rate):
        raise ValueError(f"learning_rate = {learning_rate!r}: use a positive finite learning rate, e.g. 0.5 for SGD")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer = {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum = {momentum!r}: use a value in [0, 1), e.g. 0.9")
