"""A site's own files: labels numbered by the public set, one clear line per bad file, nothing trained or spent."""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

from client.site_data import SiteDataError, load_site_records, site_files
from fedcl.protocol import ARRAYS_RECORD, METRICS_RECORD, SITE_RECORD
from fedcl.run_config import ConfigError, parse_run_config

LABELS = "cardio,derm,neuro,onco"
PROJECT = Path(__file__).resolve().parents[1]


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def site_rows(labels: list[str], per_label: int = 6) -> list[tuple[str, str]]:
    return [(f"note {i} about {label}", label) for label in labels for i in range(per_label)]


def run_config(model_dir: Path, **extra) -> dict:
    return {
        "model": str(model_dir),
        "labels": LABELS,
        "max-length": 16,
        "recipe": "lora",
        "num-rounds": 1,
        "local-steps": 2,
        "batch-size": 4,
        "num-sites": 2,
        **extra,
    }


def test_client_never_imports_simulations():
    """The site side reads only its own files: no module of client/ imports the simulations package."""
    offenders = []
    for path in sorted((PROJECT / "client").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "simulations"]
    assert offenders == []


def test_labels_are_numbered_by_the_public_set_not_by_what_a_file_holds(tmp_path):
    """Two sites with different label subsets (in different file orders) agree on every class id."""
    config = parse_run_config({"labels": LABELS})
    first = write_csv(tmp_path / "a" / "records.csv", site_rows(["onco", "cardio"]))
    second = write_csv(tmp_path / "b" / "records.csv", site_rows(["neuro", "derm", "onco"]))
    by_hand = {"cardio": 0, "derm": 1, "neuro": 2, "onco": 3}
    for path in (first, second):
        files = site_files({"data-path": str(path), "site-name": path.parent.name}, config, environ={})
        train, test = load_site_records(files, config)
        rows = list(csv.DictReader(path.open(encoding="utf-8")))
        expected = {row["text"]: by_hand[row["label"]] for row in rows}
        for part in (train, test):
            assert [expected[text] for text in part.texts] == part.labels.tolist()
        assert len(train) + len(test) == len(rows)


def test_the_sites_split_depends_on_its_node_config_not_on_the_run_config(tmp_path):
    path = write_csv(tmp_path / "records.csv", site_rows(["cardio", "derm"], per_label=10))
    node = {"data-path": str(path), "site-name": "a", "test-fraction": 0.25}
    splits = [
        load_site_records(
            site_files(node, parse_run_config({"labels": LABELS, "seed": seed}), environ={}),
            parse_run_config({"labels": LABELS}),
        )
        for seed in (1, 2)
    ]
    assert splits[0][1].texts == splits[1][1].texts and len(splits[0][1]) == 5
    other = load_site_records(
        site_files({**node, "split-seed": 3}, parse_run_config({"labels": LABELS}), environ={}),
        parse_run_config({"labels": LABELS}),
    )
    assert other[1].texts != splits[0][1].texts


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (
            [("a note", "cardio"), ("another", "flu")],
            ("text", "label"),
            r"label 'flu' is not in the federation's label set",
        ),
        ([("a note", "cardio")], ("body", "label"), r"has no column 'text' \(node config 'text-column'\)"),
        ([], ("text", "label"), r"has no records"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_problem_the_file_and_the_fix(tmp_path, rows, header, message):
    path = write_csv(tmp_path / "site" / "records.csv", rows, header)
    config = parse_run_config({"labels": LABELS})
    files = site_files({"data-path": str(path), "site-name": "a"}, config, environ={})
    with pytest.raises(SiteDataError, match=message) as caught:
        load_site_records(files, config)
    text = str(caught.value)
    assert "\n" not in text and str(path) in text


def test_missing_node_config_keys_name_the_fix():
    config = parse_run_config({"labels": LABELS})
    with pytest.raises(ConfigError, match="'data-path' is missing"):
        site_files({"site-name": "a"}, config, environ={})
    with pytest.raises(ConfigError, match="'site-name' is missing"):
        site_files({"data-path": "/x.csv"}, config, environ={})


@pytest.mark.parametrize("bad", ["label", "column", "empty", "undecodable"])
def test_a_site_with_a_bad_file_trains_nothing_spends_nothing_and_tells_the_server_no_record(
    tiny_model_dir, tmp_path, bad, task_identity
):
    """Through the ClientApp: the reply is a refusal whose reason names no label or file; no state is written."""
    from client.app import train
    from client.site_replies import DATA_ERROR

    rows = site_rows(["cardio", "derm"])
    if bad == "label":
        rows.append(("secret note", "rare-disease-x"))
    header = ("body", "label") if bad == "column" else ("text", "label")
    path = write_csv(tmp_path / "site" / "records.csv", [] if bad == "empty" else rows, header)
    if bad == "undecodable":  # a Latin-1 byte: Python's own error text would name it and its offset
        path.write_bytes(path.read_bytes() + "caf\u00e9 au lait,derm\n".encode("latin-1"))
    state = tmp_path / "state"
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(path), "site-name": "hospital-a", "state-dir": str(state)},
        state=RecordDict(),
        run_config=run_config(tiny_model_dir),
    )
    message = Message(
        content=RecordDict({ARRAYS_RECORD: ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    reply = train(message, context)
    record = dict(reply.content.config_records[SITE_RECORD])
    assert record["status"] == "refused" and record["site"] == "hospital-a"
    assert record["reason"] == DATA_ERROR and "rare-disease-x" not in record["reason"] and "0xe9" not in str(record)
    assert ARRAYS_RECORD not in reply.content.array_records and METRICS_RECORD not in reply.content.metric_records
    assert not state.exists() or not any(state.iterdir())  # no ledger, no fingerprint: nothing trained or spent


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_an_unexpected_error_before_the_round_sends_a_fixed_reason_not_its_text(
    tiny_model_dir, tmp_path, monkeypatch, kind, task_identity
):
    """Any exception while the site reads its files stays in its log: Flower would send its text to the server."""
    import client.app as site_app
    import client.site_handlers as site_handlers

    def broken(*_args, **_kwargs):
        raise RuntimeError("record 17 reads 'patient Jane Doe'")

    monkeypatch.setattr(site_handlers, "site_runtime", broken)
    path = write_csv(tmp_path / "site" / "records.csv", site_rows(["cardio", "derm"]))
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(path), "site-name": "hospital-a", "state-dir": str(tmp_path / "state")},
        state=RecordDict(),
        run_config=run_config(tiny_model_dir),
    )
    message = Message(
        content=RecordDict({ARRAYS_RECORD: ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN if kind == "train" else MessageType.EVALUATE,
    )
    reply = (site_app.train if kind == "train" else site_app.evaluate_global)(message, context)
    assert not reply.has_error()
    record = dict(reply.content.config_records[SITE_RECORD])
    assert record == {"site": "hospital-a", "status": "refused", "reason": site_app.INTERNAL_ERROR}


def test_a_site_that_lacks_a_label_trains_and_its_labels_index_the_shared_head(tiny_model_dir, tmp_path):
    from client.site_runtime import site_runtime

    path = write_csv(tmp_path / "site" / "records.csv", site_rows(["neuro", "onco"]))
    runtime = site_runtime(
        run_config(tiny_model_dir),
        {"data-path": str(path), "site-name": "a", "state-dir": str(tmp_path / "s")},
        environ={},
    )
    assert runtime.adapter.model.config.num_labels == 4
    held = np.unique(np.concatenate([runtime.data.train.labels.numpy(), runtime.data.test.labels.numpy()]))
    assert held.tolist() == [2, 3]


def test_the_launchers_copies_of_record_text_are_readable_by_their_owner_only(tmp_path):
    import stat

    from fedcl.run_config import parse_run_config
    from simulations.run import pyproject_defaults
    from simulations.site_files import virtual_sites, write_site_files

    config = parse_run_config({**pyproject_defaults(), "max-train-examples": 10, "max-test-examples": 5})
    root = tmp_path / "site-data"
    write_site_files(virtual_sites(config), root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    files = sorted(root.rglob("*.csv"))
    assert len(files) == 2 * config.num_sites and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    assert {stat.S_IMODE(f.parent.stat().st_mode) for f in files} == {0o700}
