"""The ClientApp's train and evaluate handlers: the ones that need torch, the model and the site's records.

``client/app.py`` imports this module only inside its ``train`` and
``evaluate_global`` functions: in deployment Flower starts a fresh ClientApp
process for every message, and the secure-aggregation stages (which read only
policy and state) must not pay for importing torch, transformers and peft.

Train: read the site's policy (node config) and check the run's proposal
against it, install the global adapter from the message (or the seeded
initial one), run the site round (``client/site_round.py``), reply with the
trained tensors (or the class-sum release; under secure aggregation, their
masked words: ``client/secure_update.py``) and the allow-listed metrics, or
with no update and the reason. Evaluate: install the global model and
evaluate it on the site's own test split.
"""

from __future__ import annotations

import traceback
from logging import ERROR

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from client.data_fingerprint import check_data_fingerprint
from client.evaluation import evaluate_adapter, evaluate_class_sums
from client.feature_store import attach_feature_store
from client.privacy_ledger import LedgerError
from client.secure_release import BitWidthError, SecureRound
from client.secure_stages import SecureStageError, mask_stage
from client.secure_update import SecureUpdateError, check_global_tensors, masked_update
from client.site_budget import SiteBusyError
from client.site_policy import SitePolicy, check_proposal, site_policy
from client.site_replies import INTERNAL_ERROR, internal_failure, refusal, site_record
from client.site_round import RoundResult, site_round
from client.site_runtime import SiteRuntime, site_runtime
from client.site_state import SiteState, open_state
from client.update_codec import install_global, received_arrays, reply_arrays, reply_names, strategy_freezing
from fedcl.model_factory import configure_torch_threads
from fedcl.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    SECAGG_RECORD,
    SERVER_ROUND,
    SITE_RECORD,
    allowed_evaluation_metric,
    allowed_train_metrics,
    to_numpy,
    to_record,
)
from fedcl.run_config import ConfigError, RunConfig


def _prepare(msg: Message, context: Context) -> tuple[SiteRuntime, SitePolicy, SiteState, dict]:
    """Parse configs, check the run's proposal against the site's policy and its records against its state."""
    configure_torch_threads()
    policy = site_policy(context.node_config)
    runtime = site_runtime(context.run_config, context.node_config)
    check_proposal(policy, runtime.config)
    state = open_state(policy.state_dir)
    check_data_fingerprint(state, runtime)
    attach_feature_store(runtime, context.node_config, state)  # features of its records kept in its state dir
    round_config = dict(msg.content.config_records.get(CONFIG_RECORD, ConfigRecord()))
    return runtime, policy, state, round_config


def reply_metrics(result: RoundResult, dp: bool) -> dict[str, float]:
    """The result's metrics restricted to the allow-list (``fedcl/protocol.py``); anything else stays on site."""
    allowed = allowed_train_metrics(dp)
    return {key: value for key, value in result.metrics.items() if key in allowed}


def train(msg: Message, context: Context) -> Message:
    """Run this site's round on its private training records (or decline, with the reason)."""
    try:
        runtime, policy, state, round_config = _prepare(msg, context)
    except ConfigError as err:  # SiteDataError included
        return refusal(msg, context, err)
    except Exception:  # its text may name the site's data (a byte of its file): it stays in the site's log
        return internal_failure(msg, context, "round")
    ncm = runtime.config.chosen_recipe == "ncm"
    received = {} if ncm else received_arrays(msg, runtime)
    try:
        if not ncm:
            install_global(runtime, received)  # decoded; FFA: A from the seeded state
        secure = _secure_round(msg, context, runtime.config, policy, state, round_config)
        if secure is not None and not ncm:  # the reply is the change from the received tensors
            check_global_tensors(received, reply_names(runtime, received))
        with strategy_freezing(runtime):  # FFA: lora_A frozen while training
            result = site_round(runtime, policy, state, round_config, run_id=context.run_id, secure=secure)
        if secure is not None and not ncm and result.status == "trained":  # the ledger holds the round already
            result.release = masked_update(reply_arrays(runtime, received), received, result.weight, secure)
    except (SecureStageError, BitWidthError, SecureUpdateError) as err:  # fixed public reasons
        log(ERROR, "%s: %s", runtime.data.name, err)
        result = RoundResult("refused", str(err))
    except (ConfigError, LedgerError, SiteBusyError) as err:  # decided by settings and state, not records: may go
        result = RoundResult("refused", str(err))
    except Exception:  # its text may carry values derived from records: it stays in the site's log
        log(ERROR, "%s: the round failed:\n%s", runtime.data.name, traceback.format_exc())
        result = RoundResult("refused", INTERNAL_ERROR)
    content = RecordDict(
        {
            METRICS_RECORD: MetricRecord(reply_metrics(result, policy.dp)),
            SITE_RECORD: site_record(runtime.data.name, result.status, result.reason),
        }
    )
    if result.status == "trained":
        arrays = result.release if result.release is not None else reply_arrays(runtime, received)
        content[ARRAYS_RECORD] = to_record(arrays)
    return Message(content=content, reply_to=msg)


def _secure_round(
    msg: Message, context: Context, config: RunConfig, policy: SitePolicy, state: SiteState, round_config: dict
) -> SecureRound | None:
    """Stage 3 of a secure round: the mask request's :class:`SecureRound`, or None when the run is not secure."""
    if not config.secure_aggregation:
        return None
    request = dict(msg.content.config_records.get(SECAGG_RECORD, ConfigRecord()))
    server_round = int(round_config.get(SERVER_ROUND, 0))
    return mask_stage(state, context.run_id, server_round, request, config, policy)


def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's own test split (allow-listed keys only)."""
    try:
        runtime, policy, _, round_config = _prepare(msg, context)
    except ConfigError as err:
        return refusal(msg, context, err)
    except Exception:  # as in train
        return internal_failure(msg, context, "evaluation")
    server_round = int(round_config.get(SERVER_ROUND, 1))
    try:
        if runtime.config.chosen_recipe == "ncm":
            received = msg.content.array_records.get(ARRAYS_RECORD, ArrayRecord())
            metrics = evaluate_class_sums(runtime, to_numpy(received) if len(received) else {}, server_round)
        else:
            install_global(runtime, received_arrays(msg, runtime))
            metrics = evaluate_adapter(runtime, server_round)
    except Exception:  # as in train: the text stays in the site's log
        log(ERROR, "%s: the evaluation failed:\n%s", runtime.data.name, traceback.format_exc())
        return Message(
            content=RecordDict({SITE_RECORD: site_record(runtime.data.name, "refused", INTERNAL_ERROR)}), reply_to=msg
        )
    released = {key: value for key, value in metrics.items() if allowed_evaluation_metric(key, policy.dp)}
    content = RecordDict(
        {METRICS_RECORD: MetricRecord(released), SITE_RECORD: site_record(runtime.data.name, "evaluated")}
    )
    return Message(content=content, reply_to=msg)
