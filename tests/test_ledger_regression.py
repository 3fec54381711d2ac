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
