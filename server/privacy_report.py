"""What the server learns about each site's privacy ledger, round by round: the summary entries and regressions.

The server cannot see a site's disk. From each training reply it keeps the
site's last reported ledger figures (summary.json's ``privacy`` object) and
the most DP steps the site ever reported, so that a ledger that goes
backwards (a reset or rolled-back state directory) is flagged. All of it is
part of the server's checkpoint (:meth:`PrivacyWatch.state`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import ERROR
from typing import Any

from flwr.common.logger import log

from strategies.site_strategy import SiteReply


def flag_step_regressions(
    server_round: int, replies: Sequence[SiteReply], last_steps: dict[str, int], regressions: list[dict]
) -> None:
    """Flag every site whose ledger reports fewer DP steps than it reported before (a reset or rolled-back ledger).

    The server remembers each site's last ``dp-steps-total`` in ``last_steps``.
    A regression is marked on the reply (so metrics.jsonl shows
    ``ledger_regression``), appended to ``regressions`` (summary.json's
    ``ledger_regressions``) and logged as an error.
    """
    for reply in replies:
        steps = reply.metrics.get("dp-steps-total")
        if steps is None:
            continue
        before = last_steps.get(reply.site)
        if before is not None and int(steps) < before:
            reply.metrics["ledger-regression"] = before
            regressions.append(
                {"round": server_round, "site": reply.site, "steps_before": before, "steps_now": int(steps)}
            )
            log(
                ERROR,
                "fedcl: %s reports %d DP steps after %d: its ledger was reset or rolled back; its epsilon "
                "no longer covers what it released",
                reply.site,
                int(steps),
                before,
            )
        last_steps[reply.site] = max(int(steps), before or 0)


def update_privacy_entries(entries: dict[str, dict], replies: Sequence[SiteReply], target_epsilon: float) -> None:
    """Fold one round's training replies into ``entries``: each site's last reported ledger figures."""
    for reply in replies:
        if reply.status == "rejected" or "epsilon" not in reply.metrics:
            continue  # a refused identity speaks for no site's ledger
        m = reply.metrics
        entry = entries.setdefault(reply.site, {"stopped_for_budget": False})
        entry.update({"epsilon": m["epsilon"], "accountant": "rdp-filter"})
        # A skip runs no mechanism and so reports no noise, rate or clip: the last trained mechanism's stay.
        for key, metric in (
            ("delta", "delta"),
            ("noise_multiplier", "noise-multiplier"),
            ("max_grad_norm", "max-grad-norm"),
            ("steps", "dp-steps-total"),
            ("sample_rate", "sample-rate"),
        ):
            if m.get(metric) is not None or key not in entry:
                entry[key] = m.get(metric)
        entry["target_epsilon"] = m.get("target-epsilon", target_epsilon)
        entry["stopped_for_budget"] = entry["stopped_for_budget"] or bool(m.get("stopped-for-budget"))


class PrivacyWatch:
    """The server's memory of the sites' ledgers: last steps, regressions, and the summary entries."""

    def __init__(self, dp: bool, target_epsilon: float) -> None:
        self.dp = dp
        self.target_epsilon = target_epsilon
        self.last_steps: dict[str, int] = {}  # site -> the most DP steps it reported
        self.regressions: list[dict] = []
        self.entries: dict[str, dict] = {}  # site -> summary.json's privacy entry

    def observe(self, server_round: int, replies: Sequence[SiteReply]) -> None:
        """Check and record one round's training replies (marks regressions on the replies themselves)."""
        accepted = [r for r in replies if r.status != "rejected"]
        flag_step_regressions(server_round, accepted, self.last_steps, self.regressions)
        update_privacy_entries(self.entries, accepted, self.target_epsilon)

    def summary(self) -> dict[str, dict] | None:
        """summary.json's ``privacy`` object (None without DP)."""
        return {site: dict(entry) for site, entry in sorted(self.entries.items())} if self.dp else None

    def state(self) -> dict[str, Any]:
        """JSON-ready memory for the checkpoint."""
        return {"last_steps": dict(self.last_steps), "regressions": list(self.regressions), "entries": self.entries}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self.last_steps = {str(k): int(v) for k, v in dict(state.get("last_steps", {})).items()}
        self.regressions = [dict(r) for r in state.get("regressions", [])]
        self.entries = {str(k): dict(v) for k, v in dict(state.get("entries", {})).items()}
