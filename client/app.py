"""The ClientApp: thin Flower glue over the one site round.

Train and evaluate (``client/site_handlers.py``): read the site's policy
(node config), run the site round or evaluate the global model on the site's
own test split, reply with the allow-listed outputs or with the reason it
declined. Secure aggregation (``secure-aggregation``): three more train
actions answer the protocol's key, share and unmask stages
(``client/secure_stages.py``); the masked release itself is the round's train
message (the ncm class sums, or the probe and LoRA tensors masked by
``client/secure_update.py``).

Importing this module imports no torch: in deployment Flower starts a fresh
ClientApp process for every message, and the three stages read only the
site's policy, the run config and the site's protocol state. Only a train or
evaluate message imports the handlers that need torch.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from logging import ERROR

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.secure_stages import SecureStageError, advertise_keys, share_keys, unmask
from client.site_policy import check_proposal, site_policy
from client.site_replies import INTERNAL_ERROR, internal_failure, refusal, site_name, site_record
from client.site_state import open_state
from fedcl.protocol import (
    CONFIG_RECORD,
    SECAGG_KEYS,
    SECAGG_RECORD,
    SECAGG_SHARES,
    SECAGG_UNMASK,
    SERVER_ROUND,
    SITE_RECORD,
)
from fedcl.run_config import ConfigError, parse_run_config

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run this site's round on its private training records (or decline, with the reason)."""
    try:  # imported here: a fresh process per message in deployment, and the secure stages must not pay for torch
        from client import site_handlers
    except Exception:  # a broken install: the fixed reason, the traceback in the site's log
        return internal_failure(msg, context, "round")
    return site_handlers.train(msg, context)


def _secure_stage(msg: Message, context: Context, stage: Callable[..., dict]) -> Message:
    """Answer one key, share or unmask stage: the stage's ConfigRecord, or a refusal with a fixed public reason.

    ``stage(state, run_id, server_round, request, config, policy)`` is one of
    ``client/secure_stages.py``'s; only policy and state are read (no records).
    """
    site = site_name(context)
    try:
        policy = site_policy(context.node_config)
        config = parse_run_config(context.run_config)
        check_proposal(policy, config)
        state = open_state(policy.state_dir)
    except ConfigError as err:
        return refusal(msg, context, err)
    except Exception:
        return internal_failure(msg, context, "secure-aggregation stage")
    request = dict(msg.content.config_records.get(SECAGG_RECORD, ConfigRecord()))
    server_round = int(dict(msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())).get(SERVER_ROUND, 0))
    try:
        answer = stage(state, context.run_id, server_round, request, config, policy)
    except SecureStageError as err:
        log(ERROR, "%s: %s", site, err)
        return Message(content=RecordDict({SITE_RECORD: site_record(site, "refused", str(err))}), reply_to=msg)
    except Exception:  # never the text: it could name a secret or a value of the site's state
        log(ERROR, "%s: a secure-aggregation stage failed:\n%s", site, traceback.format_exc())
        return Message(content=RecordDict({SITE_RECORD: site_record(site, "refused", INTERNAL_ERROR)}), reply_to=msg)
    content = RecordDict({SITE_RECORD: site_record(site, "answered"), SECAGG_RECORD: ConfigRecord(answer)})
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
    try:  # imported here, as in train
        from client import site_handlers
    except Exception:
        return internal_failure(msg, context, "evaluation")
    return site_handlers.evaluate_global(msg, context)
