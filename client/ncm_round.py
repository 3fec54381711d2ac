"""The private nearest-class-mean recipe (``recipe = "ncm"``), site side: one Gaussian release per experience.

Train (one round per experience): the site sums the L2-normalised
mean-pooled frozen-base features of its records of the current experience per
class and releases the sums of that experience's classes (the global plan's,
whether or not the site holds them) through the Gaussian mechanism
(``client/nearest_class_mean.py``: L2 sensitivity 1). The ledger records one
step ``(sigma, 1.0, 1)`` per release. The server adds every site's releases
(``strategies/ncm_sums.py``) and sends the running sums back.

Evaluate: cosine of each test record's feature to the released class sums.

Privacy accounting: the releases of different experiences are on disjoint
records, so by parallel composition each record is covered by one release;
the ledger composes them sequentially (it only knows sequential
composition), which over-counts and is safe. The noise is calibrated so that
this sequential total of the site's remaining releases meets
``target-epsilon`` (``client/noise_plan.py`` with segments ``(1.0, releases)``).
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.continual_round import experience_counts, stream_context
from client.local_training import Encoded, trim_padding
from client.nearest_class_mean import class_feature_sums, mean_pooled_features, release_class_sums
from client.privacy_ledger import BudgetError
from client.site_runtime import SiteRuntime, site_runtime
from client.site_state import site_state
from client.site_trainer import RoundResult, _privacy_metrics, budget_stop, open_ledger
from client.warm_calibration import noise_for_plan
from fedcl.model_factory import configure_torch_threads
from strategies.ncm_aggregator import SUMS  # the one array of a release and of the global state
from strategies.site_strategy import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, SITE_RECORD, to_numpy, to_record

_FEATURES: dict[tuple, np.ndarray] = {}


def ncm_features(runtime: SiteRuntime, split: str) -> np.ndarray:
    """Normalised mean-pooled frozen-base features of a split (computed once per process)."""
    config = runtime.config
    key = (config.model, config.dataset, config.max_length, config.seed, runtime.data.name, split,
           config.max_train_examples, config.max_test_examples, config.partition, config.num_sites)
    if key not in _FEATURES:
        data: Encoded = runtime.data.train if split == "train" else runtime.data.test
        chunks = []
        for start in range(0, len(data), config.eval_batch_size):
            rows = torch.arange(start, min(start + config.eval_batch_size, len(data)))
            chunks.append(mean_pooled_features(runtime.adapter.model, trim_padding(data.rows(rows)),
                                               batch_size=config.eval_batch_size))
        _FEATURES[key] = np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)
    return _FEATURES[key]


def _runtime_and_config(msg: Message, context: Context) -> tuple[SiteRuntime, dict]:
    configure_torch_threads()
    runtime = site_runtime(context.run_config, context.node_config)
    return runtime, dict(msg.content.config_records.get(CONFIG_RECORD, ConfigRecord()))


def _site_record(runtime: SiteRuntime, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"site": runtime.data.name, "status": status, "reason": reason,
                         "label-names": list(runtime.data.label_names)})


def release_round(runtime: SiteRuntime, round_config: dict, state: Any) -> tuple[RoundResult, np.ndarray | None]:
    """This slot's release of the site's class sums (or a skip with the reason), and the noisy sums."""
    config, ctx = runtime.config, stream_context(runtime)
    ctx.check_plan(str(round_config.get("experience-plan", "")))
    experience = ctx.schedule.site_experience(int(round_config["experience"]), runtime.data.index)
    releases = ctx.schedule.training_experiences
    if not 0 <= experience < releases:
        where = "not started (joins late)" if experience < 0 else "stream finished"
        return RoundResult("skipped", f"{where}: no release in this slot", {"experience": experience}), None
    positions = ctx.train_positions(experience)
    if len(positions) == 0:
        return RoundResult("skipped", f"empty experience: no training records in experience {experience}",
                           {"experience": experience}), None
    features = ncm_features(runtime, "train")[positions]
    labels = runtime.data.train.labels.numpy()[positions]
    classes = ctx.labels[experience] if not ctx.schedule.joint else np.arange(len(runtime.data.label_names))
    sums = class_feature_sums(features, labels, len(runtime.data.label_names))
    facts = {"experience": experience, "num-examples": len(positions), "released-classes": len(classes)}
    if not config.dp:
        release = release_class_sums(sums, classes, 0.0, np.random.default_rng(config.seed))
        return RoundResult("trained", "", facts), release.sums
    ledger = open_ledger(state, config)
    remaining = [(1.0, releases - experience)]
    try:
        sigma = config.noise_multiplier or noise_for_plan(state.noise_plan, ledger, remaining).noise_multiplier
    except BudgetError as err:  # nothing left for the remaining releases: the hard stop, not a crash
        return budget_stop(ledger, err, facts), None
    if not ledger.can_afford(sigma, 1.0, 1):
        spent = ledger.epsilon()
        return RoundResult("skipped", f"privacy budget: epsilon spent {spent:.3f} of {config.target_epsilon}; "
                           f"this release would reach {ledger.epsilon_if(sigma, 1.0, 1):.3f}",
                           {**facts, "epsilon": spent, "stopped-for-budget": 1}), None
    release = release_class_sums(sums, classes, sigma, np.random.default_rng(secrets.randbits(128)))
    ledger.record(*release.ledger_steps)
    ledger.save(state.ledger)
    return RoundResult("trained", "", {**facts, "epsilon": ledger.epsilon(), "stopped-for-budget": 0,
                                       **_privacy_metrics(ledger, sigma, 1.0, config)}), release.sums


def ncm_train(msg: Message, context: Context) -> Message:
    """Release this experience's noisy class sums (the ClientApp's train handler under ``recipe = "ncm"``)."""
    runtime, round_config = _runtime_and_config(msg, context)
    state = site_state(context.node_config, str(round_config.get("run-dir", "")), runtime.data.name)
    result, sums = release_round(runtime, round_config, state)
    content = RecordDict({METRICS_RECORD: MetricRecord(result.metrics),
                          SITE_RECORD: _site_record(runtime, result.status, result.reason)})
    if sums is not None:
        content[ARRAYS_RECORD] = to_record({SUMS: sums})
    return Message(content=content, reply_to=msg)


def ncm_evaluate(msg: Message, context: Context) -> Message:
    """Cosine nearest-class-mean on the site's test split with the federated sums received."""
    from strategies.ncm_sums import predict_nearest_class

    runtime, round_config = _runtime_and_config(msg, context)
    received = msg.content.array_records.get(ARRAYS_RECORD, ArrayRecord())
    sums = to_numpy(received).get(SUMS) if len(received) else None
    labels = runtime.data.test.labels.numpy()
    released = [] if sums is None else np.flatnonzero(np.abs(sums).sum(axis=1) > 0)
    if len(released):
        predictions = predict_nearest_class(ncm_features(runtime, "test"), sums, released)
    else:
        predictions = np.full(len(labels), -1)
    metrics = {"num-examples": len(labels), "accuracy": float(np.mean(predictions == labels)) if len(labels) else 0.0,
               **experience_counts(runtime, predictions, int(round_config.get("server-round", 1)))}
    content = RecordDict({METRICS_RECORD: MetricRecord(metrics), SITE_RECORD: _site_record(runtime, "evaluated")})
    return Message(content=content, reply_to=msg)
