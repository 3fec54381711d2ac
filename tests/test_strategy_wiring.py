"""The strategies wired into Flower: real Message replies through SiteStrategy, and the client's side of FFA and codecs.

Messages are built by hand, as Flower's own strategy tests do; the client
tests call the real ClientApp train function on a tiny random BERT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.supercore.task_identity import TaskIdentity
from site_helpers import runtime_of, site_context
from strategy_helpers import random_adapter

from fedcl.run_config import (
    ATTACKS,
    COMPRESSIONS,
    ROBUST_MODES,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    ConfigError,
    parse_run_config,
)
from server.strategy_setup import aggregation_summary, build_strategy
from strategies import registry
from strategies.aggregation import SiteUpdate
from strategies.compression import encode_arrays, serialized_bytes
from strategies.ffa import ffa_frozen_names, ffa_trainable_names
from strategies.site_strategy import ARRAYS_RECORD, METRICS_RECORD, SITE_RECORD, to_numpy, to_record


class FakeGrid:
    """Just enough of a Grid for FedAvg's node sampling."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages need a run and node identity, which Flower sets in its own processes."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def site_reply(instruction: Message, site: str, arrays: dict | None, examples: int = 10) -> Message:
    content = RecordDict(
        {
            METRICS_RECORD: MetricRecord({"num-examples": examples, "train-loss": 1.0}),
            SITE_RECORD: ConfigRecord({"site": site, "status": "trained", "reason": ""}),
        }
    )
    if arrays is not None:
        content[ARRAYS_RECORD] = to_record(arrays)
    return Message(content=content, reply_to=instruction)


def instruction(node: int, server_round: int, arrays: ArrayRecord | None = None) -> Message:
    return Message(
        content=RecordDict(
            {ARRAYS_RECORD: arrays or ArrayRecord(), "config": ConfigRecord({"server-round": server_round})}
        ),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )


def test_run_config_choices_are_the_registry_choices():
    assert STRATEGIES == registry.AGGREGATORS
    assert ROBUST_MODES == registry.ROBUST_MODES
    assert SERVER_OPTIMIZERS == registry.SERVER_OPTIMIZER_CHOICES
    assert COMPRESSIONS == registry.COMPRESSIONS
    assert ATTACKS == ("none", "scale", "sign-flip")


@pytest.mark.parametrize(
    "flat, key, words",
    [
        ({"strategy": "exact", "robust": "median"}, "robust", "validate or clip"),
        ({"strategy": "exact", "server-optimizer": "adam"}, "server-optimizer", "use none"),
        ({"robust": "clip"}, "max-update-norm", "positive bound"),
        ({"robust": "none", "max-update-norm": 2.0}, "max-update-norm", "checks nothing"),
        ({"robust": "trimmed-mean", "num-sites": 3, "trim-fraction": 0.2}, "trim-fraction", "at least"),
        ({"max-norm-ratio": 0.5}, "max-norm-ratio", "above 1"),
        ({"compression": "zip"}, "compression", "none, fp16, int8"),
        ({"attack": "scale", "attack-site": 3}, "attack-site", "0 .. 2"),
        ({"server-learning-rate": 0.0}, "server-learning-rate", "positive"),
    ],
)
def test_conflicting_aggregation_settings_name_key_and_fix(flat, key, words):
    with pytest.raises(ConfigError) as err:
        parse_run_config(flat)
    assert f"'{key}'" in str(err.value) and words in str(err.value)


def _good(rng: np.random.Generator, base: dict, names: list[str]) -> dict:
    return {n: base[n] + (0.01 * rng.standard_normal(base[n].shape)).astype(np.float32) for n in names}


@pytest.mark.parametrize("name", ["fedavg", "ffa", "exact"])
def test_bad_replies_are_rejected_through_flower_messages_and_the_round_completes(name):
    rng = np.random.default_rng(0)
    config = parse_run_config({"strategy": name, "num-sites": 4})  # robust = "validate", the default
    strategy = build_strategy(config)
    reference = registry.build_aggregator(name)  # the same rule without the wrapper, fed the good replies only
    grid = FakeGrid(8)
    base = random_adapter(rng)

    # Round 1: the server sends nothing; four honest sites send everything.
    sent = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert all(len(m.content[ARRAYS_RECORD]) == 0 for m in sent)
    first = {f"site-{i}": _good(rng, base, list(base)) for i in range(4)}
    arrays, _ = strategy.aggregate_train(1, [site_reply(m, s, a) for m, (s, a) in zip(sent, first.items())])
    expected = reference.aggregate({}, [SiteUpdate(s, a, 10) for s, a in first.items()])
    current = to_numpy(arrays)
    assert all(np.array_equal(current[n], expected[n]) for n in expected)

    # Round 2: four honest replies and four bad ones.
    sent = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    down = to_numpy(sent[0].content[ARRAYS_RECORD])
    names = sorted(down)
    assert names == (ffa_trainable_names(current) if name == "ffa" else sorted(current))
    good = {f"site-{i}": _good(rng, current, names) for i in range(4)}
    nan = _good(rng, current, names)
    nan[names[0]][0, 0] = np.nan
    shape = _good(rng, current, names)
    shape[names[1]] = np.zeros((shape[names[1]].shape[0] + 1, *shape[names[1]].shape[1:]), np.float32)
    missing = {n: v for n, v in _good(rng, current, names).items() if n != names[-1]}
    scaled = {n: current[n] + 1e6 * (v - current[n]) for n, v in _good(rng, current, names).items()}
    bad = {"nan": nan, "shape": shape, "missing": missing, "scaled": scaled}
    messages = [instruction(node, 2) for node in range(1, 9)]
    replies = [site_reply(m, s, a) for m, (s, a) in zip(messages, {**good, **bad}.items())]
    arrays, metrics = strategy.aggregate_train(2, replies)

    expected = reference.aggregate(current, [SiteUpdate(s, a, 10) for s, a in good.items()])
    result = to_numpy(arrays)
    assert sorted(result) == sorted(expected)
    for n in expected:
        np.testing.assert_array_equal(result[n], expected[n])
    status = {r.site: (r.status, r.reason) for r in strategy.train_replies[2]}
    assert all(status[s][0] == "trained" for s in good)
    assert status["nan"] == ("rejected", f"{names[0]} has non-finite values (NaN or inf)")
    assert status["shape"][0] == "rejected" and "shape" in status["shape"][1]
    assert status["missing"][0] == "rejected" and status["missing"][1].startswith("missing tensors")
    assert status["scaled"][0] == "rejected" and "median" in status["scaled"][1]
    assert metrics["sites-trained"] == 4 and metrics["sites-rejected"] == 4
    assert strategy.round_diagnostics[2]["rejected"] == 4
    summary = aggregation_summary(config, strategy)
    assert summary["rejected_total"] == 4 and set(summary["rejected_by_site"]) == set(bad)


def test_an_undecodable_reply_is_rejected_not_fatal():
    rng = np.random.default_rng(1)
    strategy = build_strategy(parse_run_config({"num-sites": 3, "compression": "int8"}))
    base = random_adapter(rng)
    strategy.current = base  # the strategy sends its own global model, not the arrays Flower's loop passes
    sent = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(3)))
    good = [strategy.wire.compression.encode(_good(rng, base, list(base)), reference=base) for _ in range(2)]
    no_scale = {n: v for n, v in good[0].items() if not n.endswith(".int8-scale")}
    replies = [site_reply(sent[0], "a", good[0]), site_reply(sent[1], "b", good[1]), site_reply(sent[2], "c", no_scale)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["sites-trained"] == 2
    rejected = [r for r in strategy.train_replies[1] if r.status == "rejected"]
    assert [r.site for r in rejected] == ["c"] and "int8-scale" in rejected[0].reason


def test_an_error_reply_is_recorded_as_failed_and_the_round_goes_on():
    from flwr.app import Error

    rng = np.random.default_rng(3)
    strategy = build_strategy(parse_run_config({"num-sites": 3, "min-replies": 2}))  # two replies make a round
    base = random_adapter(rng)
    sent = [instruction(node, 1) for node in (1, 2, 3)]
    replies = [
        site_reply(sent[0], "a", _good(rng, base, list(base))),
        site_reply(sent[1], "b", _good(rng, base, list(base))),
        Message(Error(code=0, reason="BudgetError: no noise multiplier fits"), reply_to=sent[2]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["sites-trained"] == 2
    failed = strategy.train_replies[1][2]
    assert (failed.site, failed.status) == ("node-3", "failed") and "BudgetError" in failed.reason
    assert strategy.aggregate_evaluate(1, [Message(Error(code=0, reason="x"), reply_to=sent[0])]) is None
    assert strategy.evaluate_replies[1][0].site == "a"  # named from its earlier reply


# --- the client's side, on a tiny random BERT ------------------------------------------------------


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sixty short texts in three topics, written once for this module."""
    vocabulary = {"sport": "goal match team", "money": "bank shares market", "music": "song band album"}
    rows = [
        f"{vocabulary[topic].split()[i % 3]} {vocabulary[topic]} news {i},{topic}"
        for i in range(20)
        for topic in vocabulary
    ]
    path = tmp_path_factory.mktemp("topics") / "topics.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def client_config(model_dir: Path, dataset: Path, **overrides) -> dict:
    flat = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "num-sites": 2,
        "partition": "iid",
        "max-length": 16,
        "max-train-examples": 24,
        "max-test-examples": 8,
        "recipe": "lora",
        "num-rounds": 2,
        "local-steps": 2,
        "batch-size": 8,
        "learning-rate": 0.05,
    }
    flat.update(overrides)
    return flat


def run_client(flat: dict, message: Message, partition: int, run_dir: Path, server_round: int = 1) -> Message:
    from client.app import train

    message.content["config"] = ConfigRecord(
        {"server-round": server_round, "phase": "lora", "plan-probe-rounds": 0, "plan-lora-rounds": 3 - server_round}
    )
    context = site_context(
        flat, run_dir / f"site-{partition}", partition, node_id=partition + 1, dp=flat.get("dp", True)
    )
    return train(message, context)


def _model_arrays(model) -> dict:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}


def test_ffa_client_keeps_a_fixed_sends_only_b_and_head_and_does_not_leak(tiny_model_dir, topics_csv, tmp_path):
    from fedcl.model_factory import trainable_arrays

    flat = client_config(tiny_model_dir, topics_csv, strategy="ffa")
    runtime = runtime_of(flat)
    initial = runtime.adapter.initial_state
    frozen = ffa_frozen_names(initial)
    assert frozen and all("lora_A" in n for n in frozen)

    # Round 1: nothing received, so the reply carries every tensor (A untouched) for the server's checkpoint.
    first = run_client(flat, instruction(1, 1), 0, tmp_path)
    sent = to_numpy(first.content[ARRAYS_RECORD])
    assert sorted(sent) == sorted(initial)
    assert all(np.array_equal(sent[n], initial[n]) for n in frozen)
    assert any(not np.array_equal(sent[n], initial[n]) for n in ffa_trainable_names(initial))

    # Round 2: the server sends B and the head only (as strategies.wire does under FFA).
    strategy = build_strategy(parse_run_config(flat))
    strategy.current = to_numpy(first.content[ARRAYS_RECORD])  # the global model the strategy sends
    down = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), FakeGrid(2)))[0]
    assert sorted(to_numpy(down.content[ARRAYS_RECORD])) == ffa_trainable_names(initial)
    second = run_client(flat, down, 0, tmp_path, server_round=2)
    reply = to_numpy(second.content[ARRAYS_RECORD])
    assert sorted(reply) == ffa_trainable_names(initial)
    model = runtime.adapter.model
    now = _model_arrays(model)
    assert all(np.array_equal(now[n], initial[n]) for n in frozen)  # DP-SGD never touched A
    assert second.content[METRICS_RECORD]["epsilon"] > 0

    # Nothing leaks: A is trainable again, and a fedavg run on the same cached model trains and sends A.
    assert all(dict(model.named_parameters())[n].requires_grad for n in frozen)
    assert sorted(trainable_arrays(model)) == sorted(initial)
    plain = run_client(
        client_config(tiny_model_dir, topics_csv, strategy="fedavg", dp=False), instruction(1, 1), 1, tmp_path / "b"
    )
    sent = to_numpy(plain.content[ARRAYS_RECORD])
    assert sorted(sent) == sorted(initial)
    assert any(not np.array_equal(sent[n], initial[n]) for n in frozen)


@pytest.mark.parametrize("codec, ratio", [("int8", 0.65), ("fp16", 0.85)])
def test_compressed_round_trip_through_client_and_server(tiny_model_dir, topics_csv, tmp_path, codec, ratio):

    flat = client_config(tiny_model_dir, topics_csv, compression=codec, dp=False)
    config = parse_run_config(flat)
    runtime = runtime_of(flat)
    strategy = build_strategy(config)
    grid = FakeGrid(2)
    arrays = ArrayRecord()
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        received = strategy.wire.compression.decode(to_numpy(messages[0].content[ARRAYS_RECORD]))
        replies, trained = [], []
        for partition, message in enumerate(messages):
            replies.append(run_client(flat, message, partition, tmp_path, server_round))
            trained.append(_model_arrays(runtime.adapter.model))  # the shared cached model, right after training
        arrays, _ = strategy.aggregate_train(server_round, replies)
    result = to_numpy(arrays)
    counts = [float(r.content[METRICS_RECORD]["num-examples"]) for r in replies]
    for name in result:
        expected = sum(c * t[name].astype(np.float64) for c, t in zip(counts, trained)) / sum(counts)
        step = max(float(np.max(np.abs(t[name] - received[name]))) for t in trained)
        tolerance = step / 254 * 1.01 + 1e-6 if codec == "int8" else step * 2**-10 + 1e-6
        assert float(np.max(np.abs(result[name] - expected))) <= tolerance, name
    # Bytes are those of the serialised encoded message (tiny tensors: npy headers weigh more than at MiniLM size).
    plain_bytes, encoded_bytes = serialized_bytes(result), serialized_bytes(encode_arrays(result, codec))
    assert encoded_bytes < ratio * plain_bytes
    assert all(r.bytes_up == encoded_bytes for r in strategy.train_replies[2])
    assert strategy.bytes_down[(2, "train")] == encoded_bytes


def test_fault_injector_corrupts_only_the_attacking_site():
    from client.fault_injection import inject_fault

    start = {"w": np.ones(3, np.float32)}
    trained = {"w": np.array([1.5, 1.0, 0.0], np.float32)}
    scale = parse_run_config({"attack": "scale", "attack-site": 1, "attack-scale": 10.0})
    flip = parse_run_config({"attack": "sign-flip", "attack-site": 1, "attack-scale": 1.0})
    np.testing.assert_allclose(inject_fault(trained, start, scale, 1)["w"], [6.0, 1.0, -9.0])
    np.testing.assert_allclose(inject_fault(trained, start, flip, 1)["w"], [0.5, 1.0, 2.0])
    assert inject_fault(trained, start, scale, 0) is trained
    assert inject_fault(trained, start, parse_run_config({}), 1) is trained


def test_partial_install_keeps_missing_tensors_and_still_refuses_unknown_ones(tiny_model_dir):
    from fedcl.model_factory import load_adapter_model, set_trainable_arrays, trainable_arrays

    adapter = load_adapter_model(parse_run_config({"model": str(tiny_model_dir)}), num_labels=3)
    before = trainable_arrays(adapter.model)
    names = ffa_trainable_names(before)
    set_trainable_arrays(adapter.model, {n: before[n] + 1 for n in names}, partial=True)
    after = trainable_arrays(adapter.model)
    assert all(np.array_equal(after[n], before[n]) for n in ffa_frozen_names(before))
    assert all(np.allclose(after[n], before[n] + 1) for n in names)
    with pytest.raises(ValueError, match="missing"):
        set_trainable_arrays(adapter.model, {n: before[n] for n in names})
    with pytest.raises(ValueError, match="unexpected"):
        set_trainable_arrays(adapter.model, {"nope": before[names[0]]}, partial=True)
    set_trainable_arrays(adapter.model, before)


def test_strategy_state_is_checkpointed_beside_the_global_arrays(tmp_path):
    from server.strategy_setup import STATE_FILE, save_strategy_state
    from strategies.exact import STATE_PREFIX

    rng = np.random.default_rng(2)
    strategy = build_strategy(parse_run_config({"strategy": "exact", "num-sites": 3, "lora-rank": 1}))
    updates = [SiteUpdate(f"s{i}", random_adapter(rng, rank=1), 5) for i in range(3)]
    strategy.aggregator.aggregate({}, updates)
    path = save_strategy_state(tmp_path, strategy)
    assert path == tmp_path / STATE_FILE
    saved = dict(np.load(path))
    assert saved and all(k.startswith(STATE_PREFIX) for k in saved)
    assert save_strategy_state(tmp_path / "none", build_strategy(parse_run_config({}))) is None


@pytest.mark.integration
def test_flwr_run_with_ffa_int8_and_an_attacker_rejects_it_and_exports_a(tiny_model_dir, topics_csv, tmp_path):
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    overrides = (
        f"model='{tiny_model_dir}' pooling='model' dataset='{topics_csv}' num-sites=3 partition='iid' "
        "recipe='lora' num-rounds=3 local-steps=2 batch-size=8 max-length=16 dp=false strategy='ffa' compression='int8' "
        f"attack='scale' attack-site=2 attack-scale=1000.0 output-dir='{run_dir}'"
    )
    done = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--run-config", overrides],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    attacker = sorted(r["site"] for r in rows)[-1]
    assert all(r["train_status"] == "rejected" for r in rows if r["site"] == attacker)
    assert all(r["train_status"] == "trained" for r in rows if r["site"] != attacker)
    first, later = [r for r in rows if r["round"] == 1], [r for r in rows if r["round"] == 3]
    assert max(r["bytes_up"] for r in later) < min(r["bytes_up"] for r in first)  # no A after round 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["aggregation"]["rejected_total"] == 3
    from safetensors.numpy import load_file

    exported = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in name for name in exported)
    # pooling='model': the checkpoint's own head, so Hugging Face's own classes load the export.
    from export_checks import assert_adapter_reproduces_summary
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=len(summary["label_names"]), ignore_mismatched_sizes=True
    )  # a new head
    assert_adapter_reproduces_summary(
        PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval(), run_dir, summary
    )


def test_the_strategies_and_the_server_setup_import_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, strategies.registry, strategies.site_strategy, strategies.wire, server.strategy_setup; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent).returncode == 0
