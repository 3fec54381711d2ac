"""The server's last line against a reset site: a site whose ledger reports fewer DP steps than before is flagged."""

from server.privacy_report import flag_step_regressions
from strategies.site_strategy import SiteReply


def reply(site: str, steps: int | None) -> SiteReply:
    return SiteReply(site, "trained", metrics={} if steps is None else {"dp-steps-total": steps})


def test_a_site_whose_step_count_drops_is_flagged_in_its_row_and_the_summary():
    last, flagged = {}, []
    flag_step_regressions(1, [reply("a", 40), reply("b", 40)], last, flagged)
    flag_step_regressions(2, [reply("a", 80), reply("b", 80)], last, flagged)
    assert flagged == []
    third = [reply("a", 120), reply("b", 40), reply("c", None)]  # b's whole state directory was restored or deleted
    flag_step_regressions(3, third, last, flagged)
    assert flagged == [{"round": 3, "site": "b", "steps_before": 80, "steps_now": 40}]
    assert third[1].metrics["ledger-regression"] == 80 and "ledger-regression" not in third[0].metrics
    flag_step_regressions(4, [reply("b", 60)], last, flagged)  # still below the most it ever reported
    assert [f["round"] for f in flagged] == [3, 4]


def test_a_budget_skip_keeps_the_last_trained_mechanisms_settings_in_the_summary():
    from server.privacy_report import update_privacy_entries

    entries: dict = {}
    trained = {"epsilon": 7.9, "delta": 1e-5, "noise-multiplier": 3.3, "max-grad-norm": 1.0, "sample-rate": 0.02}
    update_privacy_entries(entries, [SiteReply("site-0", "trained", metrics={**trained, "dp-steps-total": 800})], 8.0)
    skipped = {"epsilon": 7.9, "delta": 1e-5, "dp-steps-total": 800, "stopped-for-budget": 1}  # no mechanism ran
    update_privacy_entries(entries, [SiteReply("site-0", "skipped", metrics=skipped)], 8.0)
    assert entries["site-0"] == {
        "epsilon": 7.9,
        "delta": 1e-5,
        "noise_multiplier": 3.3,
        "max_grad_norm": 1.0,
        "sample_rate": 0.02,
        "steps": 800,
        "accountant": "rdp-filter",
        "target_epsilon": 8.0,
        "stopped_for_budget": True,
    }
