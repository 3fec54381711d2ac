"""The ClientApp: thin Flower glue over the site trainer.

Train: load the global adapter from the message (or the seeded initial one
when the message carries none), train locally, reply with the trainable
tensors and metrics. Evaluate: load the global adapter, evaluate on the
site's own test split.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local_training import evaluate, train_plain
from client.site_runtime import SiteRuntime, site_runtime
from fedcl.model_factory import configure_torch_threads, set_trainable_arrays, trainable_arrays
from strategies.site_strategy import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, SITE_RECORD, to_numpy, to_record

app = ClientApp()


def _prepare(msg: Message, context: Context) -> SiteRuntime:
    configure_torch_threads()
    runtime = site_runtime(context.run_config, context.node_config)
    received = msg.content.array_records.get(ARRAYS_RECORD, ArrayRecord())
    arrays = to_numpy(received) if len(received) else runtime.adapter.initial_state
    set_trainable_arrays(runtime.adapter.model, arrays)
    return runtime


def _site_record(runtime: SiteRuntime, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"site": runtime.data.name, "status": status, "reason": reason,
                         "label-names": list(runtime.data.label_names)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter on this site's private training split."""
    runtime = _prepare(msg, context)
    config = runtime.config
    server_round = int(msg.content.config_records.get(CONFIG_RECORD, ConfigRecord()).get("server-round", 0))
    outcome = train_plain(runtime.adapter.model, runtime.data.train, config.local_steps, config.batch_size,
                          config.learning_rate, seed=config.seed * 1000 + server_round * 10 + runtime.data.index)
    metrics = MetricRecord({"num-examples": len(runtime.data.train), "train-loss": outcome.mean_loss,
                            "train-steps": outcome.steps, "train-seconds": outcome.seconds})
    content = RecordDict({ARRAYS_RECORD: to_record(trainable_arrays(runtime.adapter.model)),
                          METRICS_RECORD: metrics, SITE_RECORD: _site_record(runtime, "trained")})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this site's own test split."""
    runtime = _prepare(msg, context)
    outcome = evaluate(runtime.adapter.model, runtime.data.test, runtime.config.eval_batch_size)
    metrics = MetricRecord({"num-examples": outcome.examples, "eval-loss": outcome.loss,
                            "accuracy": outcome.accuracy, "eval-seconds": outcome.seconds})
    content = RecordDict({METRICS_RECORD: metrics, SITE_RECORD: _site_record(runtime, "evaluated")})
    return Message(content=content, reply_to=msg)
