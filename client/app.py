"""The ClientApp: thin Flower glue over the site trainer.

Train: load the global adapter from the message (or the seeded initial one
when the message carries none), run the round's phase (client/site_trainer.py:
DP-SGD, the privacy ledger, the hard stop), reply with the trainable tensors
and metrics, or with no update and the reason. Evaluate: load the global
adapter and evaluate on the site's own test split.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.continual_round import experience_metrics, train_continual_round
from client.head_features import evaluate_head, head_module
from client.ncm_round import ncm_evaluate, ncm_train
from client.site_runtime import SiteRuntime, site_runtime
from client.site_state import keep_private_metrics, site_state
from client.site_trainer import RoundInstructions, cached_head_inputs, train_round
from client.update_codec import install_global, received_arrays, reply_arrays, strategy_freezing
from fedcl.model_factory import configure_torch_threads
from strategies.site_strategy import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, SITE_RECORD, to_record

app = ClientApp()


def _prepare(msg: Message, context: Context) -> tuple[SiteRuntime, dict]:
    """Parse configs, load data and model, install the received adapter."""
    configure_torch_threads()
    runtime = site_runtime(context.run_config, context.node_config)
    install_global(runtime, received_arrays(msg, runtime))  # decoded; FFA: A from the seeded state
    round_config = dict(msg.content.config_records.get(CONFIG_RECORD, ConfigRecord()))
    return runtime, round_config


def _site_record(runtime: SiteRuntime, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"site": runtime.data.name, "status": status, "reason": reason,
                         "label-names": list(runtime.data.label_names)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter on this site's private training split (or decline, with the reason)."""
    if context.run_config.get("recipe") == "ncm":  # releases class sums, not an adapter: client/ncm_round.py
        return ncm_train(msg, context)
    runtime, round_config = _prepare(msg, context)
    state = site_state(context.node_config, str(round_config.get("run-dir", "")), runtime.data.name)
    with strategy_freezing(runtime):  # FFA: lora_A frozen while training
        result = (train_continual_round(runtime, round_config, state) if runtime.config.continual  # a stream
                  else train_round(runtime, RoundInstructions.from_config(round_config), state))
    released = keep_private_metrics(result.metrics, state, int(round_config.get("server-round", 0))) \
        if runtime.config.dp else result.metrics
    metrics = MetricRecord({"num-examples": len(runtime.data.train), **released})
    content = RecordDict({METRICS_RECORD: metrics, SITE_RECORD: _site_record(runtime, result.status, result.reason)})
    if result.status == "trained":
        content[ARRAYS_RECORD] = to_record(reply_arrays(runtime, received_arrays(msg, runtime)))
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this site's own test split.

    The head runs on the test split's head inputs, cached per adapter state:
    the same numbers as a full forward pass (tests/test_head_features.py),
    and no transformer pass at all while the LoRA factors stay unchanged (the
    probe phase).
    """
    if context.run_config.get("recipe") == "ncm":
        return ncm_evaluate(msg, context)
    runtime, round_config = _prepare(msg, context)
    outcome = evaluate_head(head_module(runtime.adapter.model), cached_head_inputs(runtime, "test"),
                            runtime.data.test.labels)
    metrics = MetricRecord({"num-examples": outcome.examples, "eval-loss": outcome.loss,
                            "accuracy": outcome.accuracy, "eval-seconds": outcome.seconds,
                            **experience_metrics(runtime, round_config)})  # a stream: per-experience counts
    content = RecordDict({METRICS_RECORD: metrics, SITE_RECORD: _site_record(runtime, "evaluated")})
    return Message(content=content, reply_to=msg)
