"""Federated private nearest-class-mean baseline, site side: features, class sums, one Gaussian release.

Features are the frozen base model's last hidden states, mean-pooled over the
attention mask and L2-normalised (how all-MiniLM-L6-v2 was trained to be
used). A site sums the unit feature vectors of its records per class and
releases the ``[num_classes, dim]`` sums once through the Gaussian mechanism;
the server adds the sites' sums and predicts the class with the highest
cosine (``strategies/ncm_sums.py``).

Privacy: under add/remove-one adjacency one record moves exactly one class sum
by a vector of norm at most 1 (rows are clipped to norm 1 before summing, a
guard against rounding), so the L2 sensitivity of the whole release is 1 and
noise std ``sigma`` is noise multiplier ``sigma``: the site round prices and
records the mechanism ``SgdMechanism(sigma, 1.0, 1, 1.0, 1.0)`` per release
on the experience's record groups (``client/site_round.py``), and the noise
comes from the round's ``NoiseSource`` (the OS CSPRNG under DP). Every row of
the released classes gets noise, including classes the site has no record
of (otherwise which classes a site holds would leak). The site round sums
rows ``[a x, b]`` (``strategies.ncm_sums.with_count_coordinate``: norm 1, so
the sensitivity stays 1), so a noisy count per class rides in the same
release at no extra cost; the server's rule uses it as a class prior. In a
continual stream each record is released once, with its own experience:
the releases of different experiences are on disjoint records, and the
ledger composes them in parallel (one release's epsilon per record).

Calibration: the site's budget chooses sigma for all its remaining releases
against its RDP filter (``client/site_budget.py``).
:func:`client.gaussian_release.analytic_gaussian_sigma` gives the exact sigma
of one release at (epsilon, delta), for reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from client.gaussian_release import GaussianSteps

if TYPE_CHECKING:  # torch is imported lazily here
    from client.secure_noise import NoiseSource


@dataclass(frozen=True)
class ClassSumRelease:
    """A site's noisy class sums (zero rows outside ``classes``) and its ledger entry."""

    sums: np.ndarray  # float64 [num_classes, dim]
    classes: tuple[int, ...]
    ledger_steps: GaussianSteps


def mean_pooled_features(model: Any, inputs: Mapping[str, Any], batch_size: int = 64) -> np.ndarray:
    """L2-normalised mean-pooled last hidden states of the frozen base model, float32 ``[N, dim]``.

    ``model`` is a Hugging Face model; a PEFT model runs with its adapters
    disabled (``disable_adapter()``), so only the frozen base counts. Padding
    positions (``attention_mask == 0``) are left out of the mean. Each chunk
    runs on the model's device (moved there); the features come back to the
    host as numpy.
    """
    import torch

    from client.device import module_device, to_device
    from fedcl.pooled_classifier import mean_pool

    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r}: use at least 1")
    device = module_device(model)
    total = len(next(iter(inputs.values())))
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    was_training = model.training
    chunks = []
    try:
        model.eval()
        with disabled, torch.no_grad():
            for start in range(0, total, batch_size):
                chunk = to_device({k: v[start : start + batch_size] for k, v in inputs.items()}, device)
                output = model(**chunk, output_hidden_states=True)
                hidden = (
                    output.hidden_states[-1] if getattr(output, "hidden_states", None) else output.last_hidden_state
                )
                chunks.append(mean_pool(hidden, chunk.get("attention_mask")).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), dtype=np.float32)


def class_feature_sums(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class sums of the feature rows, float64 ``[num_classes, dim]``; rows are first clipped to norm 1."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and labels {labels.shape}: give one 2-D feature row per label")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be 0 .. {num_classes - 1}; got {labels.min()} .. {labels.max()}")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    clipped = features / np.maximum(norms, 1.0)
    sums = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, clipped)
    return sums


def release_class_sums(
    sums: np.ndarray, classes: Sequence[int], noise_multiplier: float, noise: NoiseSource
) -> ClassSumRelease:
    """Add Gaussian noise of std ``noise_multiplier`` (sensitivity 1) to the rows ``classes``; zero the rest.

    The noise comes from ``noise`` (``NoiseSource.secure()`` in a deployment,
    hardened as Opacus' secure_mode; ``NoiseSource.seeded`` in tests only).

    ``classes`` are the rows this release covers (e.g. the current experience's
    labels from the global plan, whether or not the site holds them). Raises
    ``ValueError`` if a row outside ``classes`` has data (those records would
    leak without noise).
    """
    sums = np.asarray(sums, dtype=np.float64)
    rows = np.asarray(sorted({int(c) for c in classes}), dtype=np.int64)
    if len(rows) == 0:
        raise ValueError("no classes to release; pass the experience's label ids")
    if rows.min() < 0 or rows.max() >= len(sums):
        raise ValueError(f"classes must be 0 .. {len(sums) - 1}; got {rows.min()} .. {rows.max()}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier {noise_multiplier!r}: use a value >= 0 (0 only for a non-private run)")
    from client.secure_noise import NoiseSource

    if not isinstance(noise, NoiseSource):
        raise ValueError(
            f"noise {noise!r}: pass a client.secure_noise.NoiseSource (NoiseSource.secure() in a deployment)"
        )
    others = np.setdiff1d(np.arange(len(sums)), rows)
    if np.any(sums[others] != 0):
        raise ValueError("the sums hold records of classes outside `classes`; release every class that has records")
    noisy = np.zeros_like(sums)
    noisy[rows] = sums[rows] + noise.gaussian_numpy((len(rows), sums.shape[1]), float(noise_multiplier))
    return ClassSumRelease(noisy, tuple(int(r) for r in rows), GaussianSteps(float(noise_multiplier), 1.0, 1))
