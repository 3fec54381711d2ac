"""What a site says in its own log, and only there: texts cut at max-length, a batch larger than its records.

Both depend on the site's data (or its size): the lines go to the site's own
log (Flower's logger; the simulation launcher shows its ``fedcl:`` lines) and
never into a reply.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from site_helpers import TRAINING_REPLY_KEYS, forget_process_state, site_context, virtual_site, write_topic_csv

from client.local_training import count_longer, encode
from client.site_runtime import truncation_note
from fedcl.protocol import ARRAYS_RECORD, METRICS_RECORD, SITE_RECORD

MAX_LENGTH = 16  # tokens, [CLS] and [SEP] included: a text of more than 14 of these words is cut


@pytest.fixture()
def long_and_short_csv(tmp_path: Path) -> Path:
    """120 records over 5 topics; every 7th is 20 words long (22 tokens), the others 6 words (8 tokens)."""
    return write_topic_csv(tmp_path / "data.csv", long_every=7, long_words=20)


def run_config(model_dir: Path, dataset: Path, **overrides) -> dict:
    return {
        "model": str(model_dir),
        "dataset": str(dataset),
        "num-sites": 2,
        "max-length": MAX_LENGTH,
        "partition": "iid",
        "recipe": "probe-then-lora",
        "probe-rounds": 2,
        "probe-steps": 2,
        "probe-batch-size": 8,
        "num-rounds": 0,
        **overrides,
    }


def message(server_round: int, kind: str = MessageType.TRAIN) -> Message:
    config = ConfigRecord({"server-round": server_round})
    return Message(
        content=RecordDict({ARRAYS_RECORD: ArrayRecord(), "config": config}), dst_node_id=1, message_type=kind
    )


def hand_count(path: str) -> tuple[int, int]:
    """(texts of more than MAX_LENGTH - 2 words, texts) in a site's file, counted by splitting on spaces."""
    with open(path, newline="", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    return sum(len(text.split()) > MAX_LENGTH - 2 for text in texts), len(texts)


def fedcl_lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("fedcl: ") and words in r.getMessage()]


def test_count_longer_matches_a_hand_count_at_the_boundary(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [" ".join(["goal"] * n) for n in (1, 13, 14, 15, 40)]  # 3, 15, 16, 17, 42 tokens with [CLS], [SEP]
    assert count_longer(tokenizer, texts, MAX_LENGTH) == 2  # 15 and 40 words are cut; 14 words fit exactly
    assert count_longer(tokenizer, texts, 64) == 0 and count_longer(tokenizer, [], MAX_LENGTH) == 0
    encoded = encode(tokenizer, texts, np.zeros(len(texts), dtype=np.int64), MAX_LENGTH)
    lengths = encoded.inputs["attention_mask"].sum(dim=1).tolist()
    assert lengths == [3, 15, 16, 16, 16]  # what encode keeps: the cut ones stop at max-length
    with pytest.raises(ValueError, match="max-length"):
        count_longer(tokenizer, texts, 0)


def test_truncation_note_says_how_many_per_split_and_nothing_when_none_is_cut():
    assert truncation_note("site-0", 128, (0, 727), (0, 182)) == ""
    assert truncation_note("site-0", 128, (37, 727), (0, 182)) == (
        "fedcl: site-0: 37 of 727 training texts are longer than max-length 128 tokens and were cut to it "
        "(raise max-length to keep more; longer is slower)"
    )
    both = truncation_note("site-1", 64, (1, 10), (2, 3))
    assert "1 of 10 training texts and 2 of 3 test texts are longer than max-length 64" in both
    assert "1 of 10 training texts is longer than max-length 64 tokens and was cut" in truncation_note(
        "site-1", 64, (1, 10), (0, 3)
    )
    with pytest.raises(ValueError, match="cut"):
        truncation_note("site-0", 128, (8, 7), (0, 0))


def test_each_site_logs_its_cut_texts_once_and_no_reply_carries_them(
    tiny_model_dir, long_and_short_csv, tmp_path, task_identity, caplog
):
    from client.app import evaluate_global, train

    flat = run_config(tiny_model_dir, long_and_short_csv)
    _, files = virtual_site(flat, 0)
    train_cut, train_total = hand_count(files["data-path"])
    test_cut, test_total = hand_count(files["test-path"])
    assert train_cut > 0 and test_cut > 0  # the data set is built to have both
    forget_process_state()  # a fresh process: the site tokenises its records at its first message
    replies = []
    with caplog.at_level(logging.WARNING, logger="flwr"):
        context = site_context(flat, tmp_path / "state")
        for server_round in (1, 2):
            replies.append(train(message(server_round), context))
            replies.append(evaluate_global(message(server_round, MessageType.EVALUATE), context))
    lines = fedcl_lines(caplog, "longer than max-length")
    assert lines == [
        f"fedcl: site-0: {train_cut} of {train_total} training texts and {test_cut} of {test_total} test texts are "
        f"longer than max-length {MAX_LENGTH} tokens and were cut to it (raise max-length to keep more; longer is "
        "slower)"
    ]  # one line, at the first message; later messages of the same process reuse the tokenised records
    for reply in replies:
        site = dict(reply.content.config_records[SITE_RECORD])
        assert site["status"] in ("trained", "evaluated"), site
        assert not any("max-length" in str(value) or "cut" in str(value) for value in site.values())
        keys = set(reply.content.metric_records[METRICS_RECORD])
        assert keys in (TRAINING_REPLY_KEYS, {"num-examples", "accuracy", "eval-loss"})  # the allow-lists, no more
        assert set(reply.content.config_records) == {SITE_RECORD}


def test_a_batch_larger_than_the_site_is_said_once_in_its_own_log(
    tiny_model_dir, long_and_short_csv, tmp_path, task_identity, caplog
):
    from client.app import train

    flat = run_config(tiny_model_dir, long_and_short_csv, **{"probe-batch-size": 96, "probe-steps": 1})
    forget_process_state()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        context = site_context(flat, tmp_path / "state")
        metrics = [dict(train(message(r), context).content.metric_records[METRICS_RECORD]) for r in (1, 2)]
    assert [m["sample-rate"] for m in metrics] == [1.0, 1.0]  # 96 > the site's 48 training records: clamped
    lines = fedcl_lines(caplog, "probe-batch-size = 96 is larger than")
    assert len(lines) == 1 and lines[0].startswith("fedcl: site-0: ") and "sample rate 1.0" in lines[0]
    assert set(metrics[0]) == TRAINING_REPLY_KEYS  # the notice adds nothing to the reply
