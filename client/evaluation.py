"""Evaluation of the received global model on the site's own test records.

What an evaluation reply carries (accuracy, loss, per-experience counts on
test records) is computed without noise: the README declares it public
("What leaves a site"), since test records are never trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from client.continual import stream_context
from client.head_features import evaluate_head, head_module
from client.phases import cached_head_inputs, frozen_features
from client.site_runtime import SiteRuntime


def evaluate_adapter(runtime: SiteRuntime, server_round: int) -> dict[str, float]:
    """Loss and accuracy of the installed global adapter on the test split, and per-experience counts."""
    outcome = evaluate_head(
        head_module(runtime.adapter.model), cached_head_inputs(runtime, "test"), runtime.data.test.labels
    )
    metrics: dict[str, float] = {
        "num-examples": outcome.examples,
        "eval-loss": outcome.loss,
        "accuracy": outcome.accuracy,
        "eval-seconds": outcome.seconds,
    }
    if runtime.config.continual:
        metrics.update(experience_metrics(runtime, server_round))
    return metrics


def experience_metrics(runtime: SiteRuntime, server_round: int) -> dict[str, float]:
    """Per-experience evaluation counts of the installed global model (``exp-J-correct``/``exp-J-total``).

    Covers the experiences seen by the end of this round's slot (every
    experience for joint); the prediction is the best of the classes seen so
    far (the public plan's; Avalanche's ``IncrementalClassifier`` has units
    for those only), and ``accuracy`` becomes the accuracy over their test
    records pooled.
    """
    context = stream_context(runtime)
    seen = context.seen_labels(context.schedule.experiences_seen(context.schedule.position(server_round).slot))
    with torch.no_grad():
        logits = head_module(runtime.adapter.model)(cached_head_inputs(runtime, "test"))
        best = logits[:, torch.as_tensor(seen, device=logits.device)].argmax(dim=-1).cpu().numpy()
    predictions = seen[best]  # among the classes seen so far
    return experience_counts(runtime, predictions, server_round)


def experience_counts(runtime: SiteRuntime, predictions: np.ndarray, server_round: int) -> dict[str, float]:
    """``exp-J-correct``/``exp-J-total`` for the experiences seen after ``server_round``'s slot, and pooled accuracy."""
    context = stream_context(runtime)
    seen = context.schedule.experiences_seen(context.schedule.position(server_round).slot)
    labels = runtime.data.test.labels.cpu().numpy()
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


def evaluate_class_sums(runtime: SiteRuntime, release: dict[str, np.ndarray], server_round: int) -> dict[str, Any]:
    """The noise-aware nearest-class-mean rule on the test split with the federated release received.

    ``release``: the global state of the ``ncm`` recipe (summed class sums and
    noise variances, ``strategies/ncm_aggregator.py``); empty before any release.
    """
    from fedcl.protocol import CLASS_SUMS, NOISE_VARIANCE
    from strategies.ncm_sums import predict_from_release

    labels = runtime.data.test.labels.cpu().numpy()
    sums = release.get(CLASS_SUMS)
    if sums is not None and NOISE_VARIANCE not in release:
        raise ValueError(
            "the global state is a nearest-class-mean release without its noise variances (written by fedcl before "
            "the count column, issue 10): it cannot be continued; start a new run"
        )
    released = [] if sums is None else np.flatnonzero(np.abs(sums).sum(axis=1) > 0)
    if len(released):
        predictions = predict_from_release(frozen_features(runtime, "test"), sums, release[NOISE_VARIANCE], released)
    else:
        predictions = np.full(len(labels), -1)
    return {
        "num-examples": len(labels),
        "accuracy": float(np.mean(predictions == labels)) if len(labels) else 0.0,
        **experience_counts(runtime, predictions, server_round),
    }
