"""The per-round progress line and its time estimate, against rows and timings written by hand."""

from server.progress import RunProgress, clock, round_counts, where_in_run


def row(site, status="trained", reason="", accuracy=0.5, epsilon=1.0, up=1000, down=2000):
    return {
        "site": site,
        "train_status": status,
        "train_reason": reason,
        "accuracy": accuracy,
        "epsilon": epsilon,
        "bytes_up": up,
        "bytes_down": down,
    }


def phases(server_round: int) -> str:
    return "probe" if server_round <= 3 else "lora"


def test_round_counts_sort_each_status_with_its_reason():
    counts = round_counts(
        [
            row("site-0"),
            row("site-1", "skipped", "privacy budget: spent"),
            row("site-2", "refused", "replayed round"),
            row("site-3", "rejected", "norm 50 > 10"),
            row("site-4", "failed", "ValueError"),
            row("site-5", "missing", ""),
        ]
    )
    assert (counts.sites, counts.answered, counts.trained) == (6, 5, 1)
    assert counts.skipped == {"site-1": "privacy budget: spent"}
    assert counts.refused == {"site-2": "replayed round"}
    assert counts.rejected == {"site-3": "norm 50 > 10"}
    assert counts.failed == {"site-4": "ValueError", "site-5": "no reply"}


def test_the_line_names_skipped_sites_their_reason_and_each_sites_epsilon():
    progress = RunProgress(total_rounds=5, phase_of=phases, target_epsilon=8.0)
    rows = [
        row("site-0", accuracy=0.9, epsilon=7.5),
        row("site-1", "skipped", "privacy budget: epsilon spent 7.99 of 8.0", accuracy=0.7, epsilon=7.99),
        row("site-2", "skipped", "privacy budget: epsilon spent 7.99 of 8.0", accuracy=0.8, epsilon=7.99),
    ]
    line = progress.round_line(2, "probe", rows, None, 1.25)
    assert line.startswith("fedcl: round 2/5 (probe) done in 1.2 s; 3 of 3 sites answered: 1 trained, 2 skipped ")
    assert "(site-1, site-2: privacy budget: epsilon spent 7.99 of 8.0)" in line
    assert "mean accuracy 0.800 (site-0 0.900, site-1 0.700, site-2 0.800)" in line
    assert "epsilon of 8: site-0 7.50, site-1 7.99, site-2 7.99" in line
    assert "0.00 MB up, 0.01 MB down" in line


def test_without_dp_there_is_no_epsilon_and_a_failed_round_says_so():
    progress = RunProgress(total_rounds=2, phase_of=phases, target_epsilon=None)
    line = progress.round_line(1, "probe", [row("site-0", "missing", accuracy=None)], "1 usable reply of 2", 3.0)
    assert "round 1/2 (probe) FAILED (1 usable reply of 2) done in 3.0 s" in line
    assert "0 of 1 sites answered: 0 trained, 1 failed (site-0: no reply)" in line
    assert "epsilon" not in line and "not evaluated" in line


def test_many_sites_are_summarised_as_a_range():
    progress = RunProgress(total_rounds=1, phase_of=phases, target_epsilon=8.0)
    rows = [row(f"site-{i}", accuracy=i / 100, epsilon=1 + i / 100) for i in range(40)]
    line = progress.round_line(1, "probe", rows, None, 1.0)
    assert "(0.000 .. 0.390 over 40 sites)" in line and "epsilon of 8: 1.00 .. 1.39 over 40 sites" in line
    assert "site-39" not in line


def test_time_left_uses_each_phases_median_leaving_out_the_slow_first_round():
    progress = RunProgress(total_rounds=5, phase_of=phases, target_epsilon=None)
    # round 1 (model load, embedding) says nothing about the next ones
    assert progress.round_line(1, "probe", [], None, 60).endswith(
        "elapsed 1 min 00 s, time left unknown + lora/probe rounds not timed yet"
    )
    assert progress.round_line(2, "probe", [], None, 1).endswith(
        "elapsed 1 min 01 s, about 1 s left + lora rounds not timed yet"
    )
    assert progress.round_line(3, "probe", [], None, 3).endswith(
        "elapsed 1 min 04 s, time left unknown + lora rounds not timed yet"
    )
    assert progress.typical_seconds("probe") == 2  # the median of rounds 2 and 3
    assert progress.round_line(4, "lora", [], None, 30).endswith("elapsed 1 min 34 s, about 30 s left")
    assert progress.round_line(5, "lora", [], None, 30).endswith("elapsed 2 min 04 s")


def test_a_resumed_run_leaves_out_its_own_first_round():
    progress = RunProgress(total_rounds=5, phase_of=phases, target_epsilon=None, first_round=2)
    progress.round_line(2, "probe", [], None, 50)  # this session's first round: model load and embedding
    assert progress.typical_seconds("probe") is None
    progress.round_line(3, "probe", [], None, 2)
    assert progress.typical_seconds("probe") == 2


def test_clock_and_where_in_run():
    assert [clock(s) for s in (5, 65, 3725)] == ["5 s", "1 min 05 s", "1 h 02 min"]
    assert where_in_run({"phase": "lora"}) == "lora"
    assert where_in_run({"phase": "probe", "experience": 1, "num-experiences": 3}) == "probe, experience 2 of 3"
    assert where_in_run({"phase": "probe", "experience": 3, "num-experiences": 3}) == "probe, slot 4 (late sites)"


def test_a_deployment_shows_only_the_serverapps_fedcl_lines_by_default():
    import io

    from fedcl.pilot.runs import ProgressLines

    out = io.StringIO()
    sink = ProgressLines(out)
    sink.write("[run 7] INFO :      [ROUND 2/21]\n")
    sink.write("[run 7] INFO :      fedcl: round 2/21 (probe) done in 0.5 s; 3 of 3 sites answered: 3 trained\n")
    sink.write("[run 7] INFO :      round 2: evaluate messages to 3 node(s)\n")
    assert out.getvalue() == "fedcl: round 2/21 (probe) done in 0.5 s; 3 of 3 sites answered: 3 trained\n"


def test_a_refused_site_is_named_apart_from_skipped_ones():
    progress = RunProgress(total_rounds=1, phase_of=phases, target_epsilon=None)
    line = progress.round_line(
        1, "probe", [row("site-0"), row("site-1", "refused", "internal error at the site")], None, 1
    )
    assert "2 of 2 sites answered: 1 trained, 1 refused (site-1: internal error at the site)" in line
    assert "skipped" not in line


def test_the_launcher_shows_fedcl_lines_and_errors_and_hides_repeats_of_what_it_said():
    from simulations.run import terminal_line

    assert terminal_line("\x1b[92mINFO \x1b[0m:      fedcl: round 1/2 (probe) done in 1.0 s; x\n") == (
        "round 1/2 (probe) done in 1.0 s; x"
    )
    assert terminal_line("INFO :      fedcl: recipe ncm (16 labels)\n") is None  # the launcher's header said it
    assert terminal_line("INFO :      fedcl: site 'site-3' bound to node 123\n") is None
    assert terminal_line("INFO :      [ROUND 2/21]\n") is None
    assert terminal_line("ERROR :     something broke\n") == "ERROR :     something broke"


def test_the_servers_own_work_is_shown_and_read_back_by_the_pilots_round_reader():
    from fedcl.pilot.run_log import round_timings

    progress = RunProgress(total_rounds=2, phase_of=phases, target_epsilon=None)
    line = progress.round_line(1, "probe", [row("site-0")], None, 12.5, server_seconds=0.375)
    assert "round 1/2 (probe) done in 12.5 s (server 0.38 s); 1 of 1 sites answered" in line
    older = "fedcl: round 2/2 (probe) done in 3.0 s; 1 of 1 sites answered: 1 trained"  # a line from before the field
    (first, second) = round_timings([(0.0, line), (1.0, older)])
    assert (first.seconds, first.server_seconds) == (12.5, 0.38)
    assert (second.seconds, second.server_seconds) == (3.0, None)
