"""The ClientApp: thin Flower glue over the one site round.

Train: read the site's policy (node config) and check the run's proposal
against it, install the global adapter from the message (or the seeded
initial one), run the site round (``client/site_round.py``), reply with the
trained tensors (or the class-sum release) and the allow-listed metrics, or
with no update and the reason. Evaluate: install the global model and
evaluate it on the site's own test split. Secure aggregation
(``secure-aggregation``): three more train actions answer the protocol's key,
share and unmask stages (``client/secure_stages.py``); the masked release
itself is the round's train message (the ncm class sums, or the probe and
LoRA tensors masked by ``client/secure_update.py``).
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from logging import ERROR

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.data_fingerprint import check_data_fingerprint
from client.evaluation import evaluate_adapter, evaluate_class_sums
from client.feature_store import attach_feature_store
from client.privacy_ledger import LedgerError
from client.secure_release import BitWidthError, SecureRound
from client.secure_stages import SecureStageError, advertise_keys, mask_stage, share_keys, unmask
from client.secure_update import masked_update
from client.site_budget import SiteBusyError
from client.site_data import SiteDataError
from client.site_policy import SitePolicy, check_proposal, site_policy
from client.site_round import RoundResult, site_round
from client.site_runtime import SiteRuntime, site_runtime
from client.site_state import SiteState, open_state
from client.update_codec import install_global, received_arrays, reply_arrays, strategy_freezing
from fedcl.model_factory import configure_torch_threads
from fedcl.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    REASON,
    SECAGG_KEYS,
    SECAGG_RECORD,
    SECAGG_SHARES,
    SECAGG_UNMASK,
    SERVER_ROUND,
    SITE_NAME,
    SITE_RECORD,
    STATUS,
    allowed_evaluation_metric,
    allowed_train_metrics,
    to_numpy,
    to_record,
)
from fedcl.run_config import ConfigError, RunConfig, parse_run_config

app = ClientApp()
INTERNAL_ERROR = "internal error at the site; its operator has the details in the site's log"
DATA_ERROR = (
    "the site's records do not fit the federation (a label or group outside the run config's set, a missing "
    "column, an empty file, a file that is not UTF-8 or not a readable CSV); nothing was trained or spent; its "
    "operator has the details in the site's log"
)


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


def _site_record(site: str, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({SITE_NAME: site, STATUS: status, REASON: reason})


def _site_name(context: Context) -> str:
    """The site's name from its node config, or its node id when it has none (a reply must name its sender)."""
    return str(context.node_config.get("site-name", "") or f"node-{context.node_id}")


def _internal_failure(msg: Message, context: Context, what: str) -> Message:
    """The reply of a site whose preparation raised an unexpected error: a fixed reason; the traceback stays here.

    An exception's text may carry values read from the site's files (Flower
    would send it whole in an error reply), so none of it leaves the site.
    """
    site = _site_name(context)
    log(ERROR, "%s: the %s failed before it started:\n%s", site, what, traceback.format_exc())
    return Message(content=RecordDict({SITE_RECORD: _site_record(site, "refused", INTERNAL_ERROR)}), reply_to=msg)


def _refusal(msg: Message, context: Context, err: Exception) -> Message:
    """The reply of a site that cannot take part: its data do not fit (details only in its log), or its settings."""
    site = _site_name(context)
    log(ERROR, "%s: %s", site, err)
    # A data error's text names records and labels: it stays on site. Other config errors come from settings.
    reason = DATA_ERROR if isinstance(err, SiteDataError) else str(err)
    return Message(content=RecordDict({SITE_RECORD: _site_record(site, "refused", reason)}), reply_to=msg)


def reply_metrics(result: RoundResult, dp: bool) -> dict[str, float]:
    """The result's metrics restricted to the allow-list (``fedcl/protocol.py``); anything else stays on site."""
    allowed = allowed_train_metrics(dp)
    return {key: value for key, value in result.metrics.items() if key in allowed}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run this site's round on its private training records (or decline, with the reason)."""
    try:
        runtime, policy, state, round_config = _prepare(msg, context)
    except ConfigError as err:  # SiteDataError included
        return _refusal(msg, context, err)
    except Exception:  # its text may name the site's data (a byte of its file): it stays in the site's log
        return _internal_failure(msg, context, "round")
    ncm = runtime.config.chosen_recipe == "ncm"
    received = {} if ncm else received_arrays(msg, runtime)
    try:
        if not ncm:
            install_global(runtime, received)  # decoded; FFA: A from the seeded state
        secure = _secure_round(msg, context, runtime.config, policy, state, round_config)
        with strategy_freezing(runtime):  # FFA: lora_A frozen while training
            result = site_round(runtime, policy, state, round_config, run_id=context.run_id, secure=secure)
        if secure is not None and not ncm and result.status == "trained":  # the ledger holds the round already
            result.release = masked_update(reply_arrays(runtime, received), result.weight, secure)
    except (SecureStageError, BitWidthError) as err:  # a fixed public reason (client/secure_stages.py)
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
            SITE_RECORD: _site_record(runtime.data.name, result.status, result.reason),
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


def _secure_stage(msg: Message, context: Context, stage: Callable[..., dict]) -> Message:
    """Answer one key, share or unmask stage: the stage's ConfigRecord, or a refusal with a fixed public reason.

    ``stage(state, run_id, server_round, request, config, policy)`` is one of
    ``client/secure_stages.py``'s; only policy and state are read (no records).
    """
    site = _site_name(context)
    try:
        policy = site_policy(context.node_config)
        config = parse_run_config(context.run_config)
        check_proposal(policy, config)
        state = open_state(policy.state_dir)
    except ConfigError as err:
        return _refusal(msg, context, err)
    except Exception:
        return _internal_failure(msg, context, "secure-aggregation stage")
    request = dict(msg.content.config_records.get(SECAGG_RECORD, ConfigRecord()))
    server_round = int(dict(msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())).get(SERVER_ROUND, 0))
    try:
        answer = stage(state, context.run_id, server_round, request, config, policy)
    except SecureStageError as err:
        log(ERROR, "%s: %s", site, err)
        return Message(content=RecordDict({SITE_RECORD: _site_record(site, "refused", str(err))}), reply_to=msg)
    except Exception:  # never the text: it could name a secret or a value of the site's state
        log(ERROR, "%s: a secure-aggregation stage failed:\n%s", site, traceback.format_exc())
        return Message(content=RecordDict({SITE_RECORD: _site_record(site, "refused", INTERNAL_ERROR)}), reply_to=msg)
    content = RecordDict({SITE_RECORD: _site_record(site, "answered"), SECAGG_RECORD: ConfigRecord(answer)})
    return Message(content=content, reply_to=msg)


@app.train(SECAGG_KEYS)
def secagg_keys(msg: Message, context: Context) -> Message:
    """Stage 1 of a secure round: fresh keys for this round, the public ones sent."""
    return _secure_stage(msg, context, functools.partial(advertise_keys, site_id=int(context.node_id)))


@app.train(SECAGG_SHARES)
def secagg_shares(msg: Message, context: Context) -> Message:
    """Stage 2: Shamir shares of this round's secrets, encrypted to each other site."""
    return _secure_stage(msg, context, share_keys)


@app.train(SECAGG_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 4: this site's shares for unmasking the survivors' sum, if enough sites survived."""
    return _secure_stage(msg, context, unmask)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's own test split (allow-listed keys only)."""
    try:
        runtime, policy, _, round_config = _prepare(msg, context)
    except ConfigError as err:
        return _refusal(msg, context, err)
    except Exception:  # as in train
        return _internal_failure(msg, context, "evaluation")
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
            content=RecordDict({SITE_RECORD: _site_record(runtime.data.name, "refused", INTERNAL_ERROR)}), reply_to=msg
        )
    released = {key: value for key, value in metrics.items() if allowed_evaluation_metric(key, policy.dp)}
    content = RecordDict(
        {METRICS_RECORD: MetricRecord(released), SITE_RECORD: _site_record(runtime.data.name, "evaluated")}
    )
    return Message(content=content, reply_to=msg)
