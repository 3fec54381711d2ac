"""The report, the comparison and TensorBoard's files from run directories written by hand (no run, no Flower)."""

import json

import numpy as np
import pytest

from fedcl.pilot.cli import main as fedcl_main
from server.report_page import write_report
from server.run_comparison import compare_runs
from server.run_record import NotARunDirectory, read_run
from server.tensorboard_log import TensorBoardLog


def site_row(r, site, accuracy, epsilon=None, status="trained", reason="", **extra):
    return {
        "round": r,
        "site": site,
        "accuracy": accuracy,
        "epsilon": epsilon,
        "train_status": status,
        "train_reason": reason,
        "bytes_up": 100,
        "bytes_down": 200,
        **extra,
    }


def write_run(folder, rows, config=None, summary=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"dp": False}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_rows_a_resume_superseded_are_left_out(tmp_path):
    rows = [
        site_row(1, "site-0", 0.5),
        site_row(2, "site-0", 0.1),  # written after the last checkpoint, before a crash
        {"event": "resume", "round": 1, "continues_at": 2},
        site_row(2, "site-0", 0.7),
    ]
    run = read_run(write_run(tmp_path / "run", rows))
    assert run.mean_accuracy() == [(1, 0.5), (2, 0.7)]
    assert run.summary is None and [e["event"] for e in run.events] == ["resume"]


def test_a_last_line_cut_short_by_a_crash_is_ignored_but_damage_elsewhere_is_named(tmp_path):
    folder = write_run(tmp_path / "run", [site_row(1, "site-0", 0.5)])
    with (folder / "metrics.jsonl").open("a") as out:
        out.write('{"round": 2, "si')
    assert read_run(folder).rounds == [1]
    (folder / "metrics.jsonl").write_text('{"round": 2, "si\n' + json.dumps(site_row(1, "site-0", 0.5)) + "\n")
    with pytest.raises(NotARunDirectory, match="line 1 is not JSON"):
        read_run(folder)


@pytest.mark.parametrize("files", [(), ("metrics.jsonl",)])
def test_a_folder_that_is_not_a_run_is_refused_with_what_is_missing(tmp_path, files):
    for name in files:
        (tmp_path / name).write_text("")
    with pytest.raises(NotARunDirectory, match="metrics.jsonl" if not files else "neither config.json"):
        read_run(tmp_path)


def test_fedcl_report_on_a_folder_that_is_not_a_run_says_so_in_one_line(tmp_path, capsys):
    assert fedcl_main(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"fedcl: error: {tmp_path} is not a fedcl run")


def test_an_unfinished_continual_run_without_dp_gets_its_matrix_problems_and_a_warning(tmp_path):
    rows = [
        site_row(1, "site-0", 0.9),
        site_row(1, "site-1", None, status="skipped", reason="not started: this site joins the stream late"),
        {"round": 1, "experience": 0, "accuracy": [0.9], "average_accuracy": 0.9, "forgetting": 0.0, "bwt": -0.0},
        site_row(2, "site-0", 0.6),
        site_row(2, "site-1", 0.8),
        {"round": 2, "experience": 1, "accuracy": [0.4, 0.8], "average_accuracy": 0.6, "forgetting": 0.5, "bwt": -0.5},
    ]
    config = {"dp": False, "stream": "class-incremental", "stream-by": "label"}
    page = write_report(write_run(tmp_path / "run", rows, config)).read_text()
    figures = sorted(p.name for p in (tmp_path / "run" / "report").glob("*.png"))
    assert figures == ["accuracy.png", "accuracy_matrix.png", "bytes.png"]  # no DP: no epsilon figure
    assert "not finished" in page and "This run used no differential privacy" in page
    assert "<td>site-1</td><td>skipped</td><td>not started: this site joins the stream late</td>" in page
    assert "stream</td><td>class-incremental by label, 2 experiences" in page
    assert '<td class="num">0.500</td>' in page  # forgetting after the last experience: 0.9 - 0.4


def test_a_private_run_states_each_sites_budget_and_who_stopped(tmp_path):
    privacy = {
        "site-0": {"epsilon": 7.99, "target_epsilon": 8.0, "delta": 1e-5, "steps": 10, "stopped_for_budget": True},
        "site-1": {"epsilon": 5.25, "target_epsilon": 8.0, "delta": 1e-5, "steps": 8, "stopped_for_budget": False},
    }
    rows = [site_row(1, "site-0", 0.5, 3.0), site_row(1, "site-1", 0.6, 3.0)]
    summary = {"status": "completed", "accuracy": 0.55, "privacy": privacy, "recipe": {"chosen": "ncm", "reason": "x"}}
    config = {"dp": True, "target-epsilon": 8.0, "delta": 1e-5}
    page = write_report(write_run(tmp_path / "run", rows, config, summary)).read_text()
    assert "the largest any site reached is 7.990" in page
    assert "Stopped for their budget:</b> site-0 (" in page
    assert "features for each class" in page  # what ncm releases
    assert '<td>site-1</td><td class="num">5.250</td><td class="num">8.000</td>' in page


def test_compare_needs_two_runs_and_reads_each_summary(tmp_path):
    a = write_run(
        tmp_path / "x" / "run", [site_row(1, "site-0", 0.5)], summary={"accuracy": 0.5, "status": "completed"}
    )
    b = write_run(tmp_path / "y" / "run", [site_row(1, "site-0", 0.7)])
    with pytest.raises(ValueError, match="at least two"):
        compare_runs([a], tmp_path / "out")
    done = compare_runs([a, b], tmp_path / "out")
    assert [(r["run"], r["accuracy"], r["status"]) for r in done.rows] == [
        ("x/run", 0.5, "completed"),
        ("y/run", 0.7, "not finished"),  # no summary yet: its last round's mean
    ]
    assert "| x/run | completed |" in done.markdown
    assert not (tmp_path / "out" / "epsilon.png").exists()  # neither run used DP


def test_tensorboard_scalars_read_back_equal_the_rows(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = TensorBoardLog(tmp_path)
    rows = {r: [site_row(r, "site-0", 0.1 * r, 0.5 * r), site_row(r, "site-1", 0.2 * r, 0.4 * r)] for r in (1, 2, 3)}
    for r, round_rows in rows.items():
        board.add_round(r, round_rows)
    board.add_experience({"round": 3, "average_accuracy": 0.4, "forgetting": 0.1, "bwt": -0.1})
    board.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    mean = [(e.step, e.value) for e in events.Scalars("accuracy/mean")]
    assert [s for s, _ in mean] == [1, 2, 3]
    assert np.allclose([v for _, v in mean], [0.15, 0.3, 0.45])
    assert [e.value for e in events.Scalars("epsilon/site-1")] == pytest.approx([0.4, 0.8, 1.2])
    assert [e.value for e in events.Scalars("bytes/down")] == [400, 400, 400]
    assert [(e.step, e.value) for e in events.Scalars("continual/bwt")] == [(3, pytest.approx(-0.1))]


def test_a_clipped_sites_row_keeps_the_rounds_clipped_count(tmp_path):
    from server.run_report import RunReport
    from strategies.site_strategy import SiteReply

    report = RunReport(tmp_path, {"dp": True})
    replies = [
        SiteReply("site-0", "trained", metrics={"update-clipped": 1}),
        SiteReply("site-1", "trained", metrics={"update-clipped": 1}),
        SiteReply("site-2", "trained", metrics={}),
    ]
    rows = report.add_round(1, replies, [], 0, 0, extra={"clipped": 2, "rejected": 0})
    assert [(r["site"], r["clipped"], r.get("update_clipped")) for r in rows] == [
        ("site-0", 2, 1),
        ("site-1", 2, 1),
        ("site-2", 2, None),
    ]


def test_sites_with_their_own_budgets_are_reported_each_with_its_own(tmp_path):
    rows = [site_row(1, "a", 0.5, 2.0, target_epsilon=4.0), site_row(1, "b", 0.6, 3.0, target_epsilon=8.0)]
    config = {"dp": True, "target-epsilon": 8.0, "delta": 1e-5}
    page = write_report(write_run(tmp_path / "run", rows, config)).read_text()
    assert "The sites set their own budgets (epsilon 4, 8); the largest any site reached is 3.000" in page
    assert read_run(tmp_path / "run").site_budgets() == {"a": 4.0, "b": 8.0}


def test_a_resumed_runs_tensorboard_shows_each_round_once(tmp_path):
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardLog(tmp_path)
    for r, accuracy in ((1, 0.1), (2, 0.2), (3, 0.3)):  # rounds 2 and 3 were written after the last checkpoint
        first.add_round(r, [site_row(r, "site-0", accuracy)])
    first.close()
    time.sleep(1.1)  # event files are named by the second they were opened
    resumed = TensorBoardLog(tmp_path, first_round=2)
    for r, accuracy in ((2, 0.7), (3, 0.8)):
        resumed.add_round(r, [site_row(r, "site-0", accuracy)])
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = [(e.step, round(e.value, 6)) for e in events.Scalars("accuracy/site-0")]
    assert got == [(1, 0.1), (2, 0.7), (3, 0.8)]


def test_the_report_says_what_the_server_saw_and_under_which_trust_assumption(tmp_path):
    from server.report_page import server_view

    rows = [site_row(1, "a", 0.5)]
    plain = read_run(write_run(tmp_path / "plain", rows, {"dp": True}))
    assert "sees each site's own noised update" in server_view(plain)
    secure_config = {"dp": True, "secure-aggregation": True, "secagg-min-honest": 3, "secagg-max-colluders": 1}
    secure = read_run(write_run(tmp_path / "secure", rows, secure_config))
    text = server_view(secure)
    assert "saw only the weighted sum" in text and "noise is its own" in text  # recipe auto here: BBC's probe
    assert "secagg-min-honest = 3" in text and "secagg-max-colluders = 1" in text
    ncm = read_run(write_run(tmp_path / "ncm", rows, {**secure_config, "recipe": "ncm"}))
    assert "sum of the sites' class sums" in server_view(ncm) and "share of the noise" in server_view(ncm)
