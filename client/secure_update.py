"""A probe or LoRA round's reply under secure aggregation: the change of its tensors, weighted, rounded and masked.

The round itself is the plain one (``client/site_round.py``): the same
DP-SGD mechanism at the site's own noise level, priced and recorded the same
way. Only the reply changes: instead of its tensors ``theta`` the site sends
the masked words of ``round(S * w * (theta - theta_global))`` and of its
weight ``w`` (its public nominal size), laid out as
``fedcl/secure_adapter.py`` says, so the server learns only the weighted sum
of the changes of the sites that finished. A secure run's every train
message carries the global tensors (the server starts from the seeded ones);
a site whose message carries none refuses before it trains.

Every coordinate is clamped to ``fedcl.secure_adapter.VALUE_BOUND`` first
(post-processing of the DP-SGD output; the site's log says when, its reply
does not); the rounding is randomised with a fresh unseeded generator
(unbiased; its randomness is not a privacy mechanism and needs no seed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import WARNING

import numpy as np
from flwr.common.logger import log

from client.secure_release import BITS_TOO_NARROW, BitWidthError, SecureRound
from fedcl.secure_adapter import VALUE_BOUND, adapter_scale, split_words, update_layout
from fedcl.secure_ncm import records_bound
from fedcl.secure_quantization import to_modular

MISSING_GLOBAL_TENSORS = (
    "the train message lacks tensors this site trains: under secure aggregation a site sends the change of each "
    "trained tensor from the message's, so it takes no part (the server sends every tensor but FFA's frozen A)"
)
NO_GLOBAL_TENSORS = (
    "the train message carries no global tensors: under secure aggregation a site sends the change of its tensors "
    "from the message's, so it takes no part (the server of a secure run sends the seeded tensors from round 1)"
)
WEIGHT_TOO_LARGE = (
    "the site's nominal size is above the run's max-train-examples, the per-site bound the word width is computed "
    "for: the sum could wrap round, so the site takes no part (raise max-train-examples or lower nominal-records)"
)


class SecureUpdateError(ValueError):
    """A secure probe or LoRA round the site cannot answer; ``str(error)`` is a fixed public reason."""


def weighted_words(arrays: Mapping[str, np.ndarray], weight: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """The unmasked int64 words: ``round(scale * weight * x)`` per coordinate (sorted names), then ``weight``.

    ``x`` (the change of each tensor) is clamped to ``[-VALUE_BOUND, VALUE_BOUND]`` (a NaN becomes 0); the rounding is
    randomised: ``floor(x) + Bernoulli(x - floor(x))``, so its mean is ``x``.
    """
    layout = update_layout(arrays)
    flat = np.concatenate([np.asarray(arrays[name], dtype=np.float64).reshape(-1) for name, _ in layout])
    undefined = np.isnan(flat)
    clamped = np.clip(np.where(undefined, 0.0, flat), -VALUE_BOUND, VALUE_BOUND)  # a NaN has no integer: sent as 0
    outside = int(np.count_nonzero(clamped != flat) - np.count_nonzero(undefined))
    if outside or undefined.any():  # the site's own log only: the counts are derived from its update
        log(
            WARNING,
            "fedcl: secure aggregation: %d coordinates clamped to +-%g and %d NaN sent as 0 before masking",
            outside,
            VALUE_BOUND,
            int(undefined.sum()),
        )
    scaled = clamped * (float(scale) * int(weight))
    low = np.floor(scaled)
    words = low.astype(np.int64) + (rng.random(len(scaled)) < scaled - low)
    return np.concatenate([words, np.array([int(weight)], dtype=np.int64)])


def update_scale(weight: int, secure: SecureRound) -> float:
    """The words' scale for this site and round; :class:`BitWidthError` (fixed public reason) if they could wrap.

    Public values only (the weight is the site's nominal size): run it before
    anything is computed or spent.
    """
    if not 1 <= int(weight) <= records_bound(secure.max_train_examples):
        raise BitWidthError(WEIGHT_TOO_LARGE)
    try:
        return adapter_scale(secure.num_sites, secure.max_train_examples, secure.bits)
    except ValueError:
        raise BitWidthError(BITS_TOO_NARROW) from None


def check_global_tensors(received: Mapping[str, np.ndarray], trained: Iterable[str]) -> None:
    """Raise :class:`SecureUpdateError` (fixed public reason) unless the message carried every ``trained`` tensor.

    ``trained``: the names the reply will carry (public: the model and the
    strategy). Run it before training: the reply is the change from the
    received tensors.
    """
    if not received:
        raise SecureUpdateError(NO_GLOBAL_TENSORS)
    if any(name not in received for name in trained):
        raise SecureUpdateError(MISSING_GLOBAL_TENSORS)


def masked_update(
    trained: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    weight: int,
    secure: SecureRound,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """The reply of a secure probe or LoRA round: ``{name: masked int64 words}`` plus the masked weight word.

    ``trained``: the tensors a plain reply would carry; ``received``: the
    message's global tensors (each of ``trained`` must be among them);
    ``weight``: the site's public nominal size. The scale comes from public
    values only (:func:`update_scale`). Raises
    :class:`~client.secure_release.BitWidthError` when the words could wrap
    and :class:`SecureUpdateError` when a global tensor is missing (both
    with fixed public reasons).
    """
    scale = update_scale(weight, secure)
    check_global_tensors(received, trained)  # checked before training too: this guard should never fire
    change = {name: np.asarray(trained[name], np.float64) - np.asarray(received[name], np.float64) for name in trained}
    words = weighted_words(change, weight, scale, rng or np.random.default_rng())
    masked = np.asarray(secure.mask(to_modular(words, secure.bits)), dtype=np.int64)
    return split_words(masked, update_layout(change))
