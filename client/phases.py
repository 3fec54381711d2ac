"""The phases of a site round, each running exactly the mechanism it is given.

- :func:`run_probe`: DP-SGD of the head on the cached head inputs of the pool
  records (only the head rows of the classes seen so far, when given).
- :func:`run_lora`: DP-SGD of LoRA and the head on the pool's tokenised rows.
- :func:`run_importance`: the private EWC importance estimate on an experience's records.
- :func:`run_class_sums`: the nearest-class-mean release of one experience's class sums.

Every phase runs on the device of the site's model (``runtime.adapter.model``,
placed by ``fedcl.model_factory.load_adapter_model``): the cached head inputs
live there, batches move there, and what a phase returns for a reply or a
state file (class sums, importances, outcomes) is CPU numpy or plain numbers.

No phase chooses a sample rate, a step count or a noise level: the
:class:`~client.mechanisms.SgdMechanism` it receives is the one the site's
budget priced (``client/site_round.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from client.continual import head_prefix, importance_batches, pool_rows
from client.dp_training import PrivateOutcome, train_private, train_private_features
from client.ewc import ImportanceEstimate, estimate_importance
from client.feature_store import FROZEN, forget_feature_stores, stored_features, stored_head_inputs
from client.head_features import adapter_fingerprint, head_inputs, head_module
from client.local_training import trim_padding
from client.mechanisms import SgdMechanism
from client.nearest_class_mean import class_feature_sums, mean_pooled_features, release_class_sums
from client.secure_noise import NoiseSource
from client.secure_release import DistributedRelease, SecureRound, masked_release, secure_class_sums
from client.site_runtime import SiteRuntime
from fedcl.protocol import CLASS_SUMS, MASKED_SUMS, NOISE_VARIANCE
from fedcl.worker_cache import WORKER_CACHE, Owners
from strategies.ncm_sums import with_count_coordinate

MOMENTUM = 0.9  # SGD with momentum after the noise: every private phase, and the probe with or without DP


def cached_head_inputs(runtime: SiteRuntime, split: str) -> torch.Tensor:
    """The head inputs of a split under the current adapter; recomputed only when the LoRA tensors change.

    One entry per site and split is kept (the latest adapter). The entry holds
    the site's data and model objects themselves and is reused only for those
    very objects (identity, not ``id()``, which Python reuses after a free), so
    a new split or model never meets stale vectors. A miss reads the site's
    feature store (``client/feature_store.py``: its state directory, where the
    features outlive the process) before embedding.
    """
    key = (runtime.data.name, split)
    fingerprint = adapter_fingerprint(runtime.adapter.model)
    cached = WORKER_CACHE.get("head-inputs", key)
    if cached is None or not cached[0].same(runtime.data, runtime.adapter) or cached[1] != fingerprint:
        data = runtime.data.train if split == "train" else runtime.data.test
        features = stored_head_inputs(
            runtime,
            split,
            fingerprint,
            lambda: head_inputs(runtime.adapter.model, data, runtime.config.eval_batch_size),
        )
        cached = WORKER_CACHE.put("head-inputs", key, (Owners(runtime.data, runtime.adapter), fingerprint, features))
    return cached[2]


def frozen_features(runtime: SiteRuntime, split: str) -> np.ndarray:
    """Unit-length mean-pooled features of the frozen base (adapters off) for a split, once per process.

    A miss reads the site's feature store before embedding (as :func:`cached_head_inputs`).
    """
    key = (runtime.data.name, split)
    cached = WORKER_CACHE.get("frozen-features", key)
    if cached is None or not cached[0].same(runtime.data, runtime.adapter):
        data = runtime.data.train if split == "train" else runtime.data.test
        size = runtime.config.eval_batch_size

        def embed() -> np.ndarray:
            chunks = [
                mean_pooled_features(
                    runtime.adapter.model,
                    trim_padding(data.rows(torch.arange(start, min(start + size, len(data))))),
                    batch_size=size,
                )
                for start in range(0, len(data), size)
            ]
            return np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)

        features = stored_features(runtime, FROZEN, split, FROZEN, embed)
        cached = WORKER_CACHE.put("frozen-features", key, (Owners(runtime.data, runtime.adapter), features))
    return cached[1]


def forget_cached_features() -> None:
    """Drop every cached feature tensor and feature store (what a restarted site process would not have)."""
    WORKER_CACHE.clear("head-inputs")
    WORKER_CACHE.clear("frozen-features")
    forget_feature_stores()


def run_probe(
    runtime: SiteRuntime,
    pool: np.ndarray,
    mechanism: SgdMechanism,
    noise: NoiseSource,
    extra_gradient: Callable | None = None,
    rows: np.ndarray | None = None,
) -> PrivateOutcome:
    """DP-SGD of the head on the pool's head inputs; with ``rows``, only those rows of a Linear head train.

    Training only the seen classes' rows (as Avalanche's ``IncrementalClassifier``
    grows its units) keeps noise off the rows of classes still to come. Which
    rows is public (the global plan); labels are mapped to row order.
    """
    index = torch.as_tensor(pool, dtype=torch.long)
    features, labels = cached_head_inputs(runtime, "train")[index], runtime.data.train.labels[index]
    head = head_module(runtime.adapter.model)
    part = head if rows is None else _rows_of(head, rows)
    if rows is not None:
        labels = torch.as_tensor(np.searchsorted(rows, labels.cpu().numpy()), dtype=torch.long)
    outcome = train_private_features(
        part,
        features,
        labels,
        mechanism,
        runtime.config.probe_learning_rate,
        noise,
        optimizer="sgd",
        momentum=MOMENTUM,
        extra_gradient=extra_gradient,
    )
    if rows is not None:
        with torch.no_grad():
            index = torch.as_tensor(rows, device=head.weight.device)
            head.weight[index] = part.weight
            head.bias[index] = part.bias
    return outcome


def run_lora(
    runtime: SiteRuntime,
    pool: np.ndarray,
    mechanism: SgdMechanism,
    noise: NoiseSource,
    extra_gradient: Callable | None = None,
) -> PrivateOutcome:
    """DP-SGD of LoRA and the head on the pool's tokenised rows (AdamW when the mechanism adds no noise).

    One optimiser per setting in every path, plain run or stream: SGD with
    momentum after the noise under DP, AdamW without DP (measured on the
    default scenario, plain recipe, 3 rounds x 5 steps at learning-rate 0.01:
    SGD with momentum reached 0.33, and at best 0.82 over learning rates up to
    1.0, where AdamW reaches about 0.93).
    """
    return train_private(
        runtime.adapter.model,
        pool_rows(runtime, pool),
        mechanism,
        runtime.config.learning_rate,
        noise,
        optimizer="sgd" if mechanism.private else "adamw",
        momentum=MOMENTUM if mechanism.private else 0.0,
        extra_gradient=extra_gradient,
    )


def run_importance(
    runtime: SiteRuntime, positions: np.ndarray, mechanism: SgdMechanism, noise: NoiseSource, lora: bool
) -> ImportanceEstimate:
    """EWC importances of the trainable parameters on ``positions``, keyed by the full model's parameter names.

    ``lora``: of LoRA + head on the tokenised rows; otherwise of the head on
    the cached head inputs (the only parameters that train).
    """
    model = runtime.adapter.model
    features = None if lora else cached_head_inputs(runtime, "train")
    batches = importance_batches(runtime, positions, mechanism.steps, mechanism.sample_rate, lora, features, noise)
    if lora:
        return estimate_importance(model, batches, mechanism, noise)
    prefix = head_prefix(model)
    estimate = estimate_importance(head_module(model), batches, mechanism, noise)
    return ImportanceEstimate(
        {prefix + k: v for k, v in estimate.importance.items()}, estimate.ledger_steps, estimate.noise_std
    )


def run_class_sums(
    runtime: SiteRuntime, positions: np.ndarray, classes: np.ndarray, mechanism: SgdMechanism, noise: NoiseSource
) -> dict[str, np.ndarray]:
    """One Gaussian release (sensitivity 1) of the class sums of ``positions``' rows ``[a x, b]`` on rows ``classes``.

    Returns the reply's arrays: the noisy sums and, per class, the noise
    variance added (``sigma^2`` on the released rows: public, from the mechanism).
    """
    rows = np.asarray(positions, dtype=np.int64)  # an empty experience indexes to a (0, dim) block
    features, labels = frozen_features(runtime, "train")[rows], runtime.data.train.labels.cpu().numpy()[rows]
    sums = class_feature_sums(with_count_coordinate(features), labels, len(runtime.data.label_names))
    release = release_class_sums(sums, classes, mechanism.noise_multiplier, noise)
    variance = np.zeros(len(sums))
    variance[list(release.classes)] = mechanism.noise_multiplier**2
    return {CLASS_SUMS: release.sums, NOISE_VARIANCE: variance}


def run_secure_class_sums(
    runtime: SiteRuntime, positions: np.ndarray, release: DistributedRelease, secure: SecureRound
) -> dict[str, np.ndarray]:
    """The same rows as :func:`run_class_sums`, released under secure aggregation (``client/secure_release.py``).

    Returns the reply's arrays: the masked words of the noised integer class
    sums (``[num_classes, dim]`` int64; nothing else about the sums leaves)
    and, per class, this share's noise variance in feature units (public:
    from ``z`` and ``n_h``; zero outside the released rows).
    """
    rows = np.asarray(positions, dtype=np.int64)
    features, labels = frozen_features(runtime, "train")[rows], runtime.data.train.labels.cpu().numpy()[rows]
    sums = secure_class_sums(
        with_count_coordinate(features), labels, len(runtime.data.label_names), release, np.random.default_rng()
    )
    variance = np.zeros(len(sums))
    variance[list(release.classes)] = release.noise_variance
    return {MASKED_SUMS: masked_release(sums, release, secure), NOISE_VARIANCE: variance}


def release_dimension(runtime: SiteRuntime) -> int:
    """The coordinates of a released row: the frozen features' dimension plus the count column (public: the model)."""
    return int(frozen_features(runtime, "train").shape[1]) + 1


def _rows_of(head: torch.nn.Linear, rows: np.ndarray) -> torch.nn.Linear:
    """A Linear holding a copy of ``rows`` of ``head`` (output units), to train and write back."""
    part = torch.nn.Linear(head.in_features, len(rows), device=head.weight.device, dtype=head.weight.dtype)
    index = torch.as_tensor(rows, device=head.weight.device)
    with torch.no_grad():
        part.weight.copy_(head.weight[index])
        part.bias.copy_(head.bias[index])
    return part
