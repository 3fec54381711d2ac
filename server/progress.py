"""The run's progress, one line per round: what the sites did, where each budget stands, how long is left.

The ServerApp logs :meth:`RunProgress.round_line` after every round; the
launcher (``simulations/run.py``) and ``fedcl run submit --stream`` show the
ServerApp's ``fedcl:`` lines, so the same line reaches a simulation's terminal
and a deployment's coordinator. Everything in it is already in the round's
metrics rows (site statuses and reasons, accuracy, epsilon, bytes): the line
adds no new value that leaves a site.

The line keeps the shape ``fedcl: round N/M (...) done in X s`` that
``fedcl/pilot/run_log.py`` reads round timings from.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MANY_SITES = 8  # above this, per-site lists become ranges: a line per round must stay readable at 1,000 sites


@dataclass(frozen=True)
class RoundCounts:
    """How the sites of one round answered its training message."""

    sites: int
    answered: int
    trained: int
    skipped: dict[str, str]  # site -> the reason it gave (its budget, not started yet, stream finished)
    refused: dict[str, str]  # site -> why it declined (its records do not fit, its policy, an internal error)
    rejected: dict[str, str]  # site -> why the server rejected its update
    failed: dict[str, str]  # site -> the error it replied with, or "no reply" for a missing site


def round_counts(rows: Sequence[Mapping[str, Any]]) -> RoundCounts:
    """Count a round's site rows (``server/run_report.py``) by training status."""
    skipped, refused, rejected, failed = {}, {}, {}, {}
    trained = answered = 0
    for row in rows:
        status, reason = row.get("train_status"), str(row.get("train_reason") or "")
        if status is None:
            continue
        answered += status != "missing"
        if status == "trained":
            trained += 1
        elif status == "skipped":
            skipped[row["site"]] = reason or status
        elif status == "refused":
            refused[row["site"]] = reason or status
        elif status == "rejected":
            rejected[row["site"]] = reason
        else:  # "failed" (an error reply) or "missing" (no reply in time)
            failed[row["site"]] = reason or ("no reply" if status == "missing" else status)
    return RoundCounts(len(rows), answered, trained, skipped, refused, rejected, failed)


@dataclass
class RunProgress:
    """Per-round progress lines and the time left, estimated per phase from the rounds timed so far.

    ``phase_of(round)`` names the phase of any round of the run (probe, lora,
    ncm): rounds of one phase take about as long as each other, the first
    round of the session (model load, embedding) excepted.
    """

    total_rounds: int
    phase_of: Callable[[int], str]
    target_epsilon: float | None  # None without DP
    first_round: int = 1
    elapsed: float = 0.0
    seconds: dict[int, float] = field(default_factory=dict)

    def round_line(
        self,
        server_round: int,
        where: str,
        rows: Sequence[Mapping[str, Any]],
        failure: str | None,
        seconds: float,
        server_seconds: float | None = None,
    ) -> str:
        """The line for a finished round; ``where`` is its phase and experience in words, e.g. ``probe, experience 1 of 3``.

        ``server_seconds``, when given, is the part of ``seconds`` the server
        itself worked (messages, aggregation, report, checkpoint) rather than
        waited for sites; it is shown as ``(server 0.4 s)``.
        """
        self.seconds[server_round] = seconds
        self.elapsed += seconds
        counts = round_counts(rows)
        verdict = f" FAILED ({failure})" if failure else ""
        server = "" if server_seconds is None else f" (server {server_seconds:.2f} s)"
        parts = [
            f"fedcl: round {server_round}/{self.total_rounds} ({where}){verdict} done in {seconds:.1f} s{server}",
            describe_counts(counts),
            describe_accuracy(rows),
        ]
        if self.target_epsilon is not None:
            parts.append(describe_epsilon(rows, self.target_epsilon))
        parts.append(describe_bytes(rows))
        parts.append(f"elapsed {clock(self.elapsed)}{self.time_left(server_round)}")
        return "; ".join(part for part in parts if part)

    def time_left(self, server_round: int) -> str:
        """``, about 3 min left`` from the rounds timed so far (nothing after the last round)."""
        remaining = [self.phase_of(r) for r in range(server_round + 1, self.total_rounds + 1)]
        if not remaining:
            return ""
        typical = {phase: self.typical_seconds(phase) for phase in set(remaining)}
        known = sum(typical[phase] for phase in remaining if typical[phase] is not None)
        untimed = sorted({phase for phase in remaining if typical[phase] is None})
        more = f" + {'/'.join(untimed)} rounds not timed yet" if untimed else ""
        return f", about {clock(known)} left{more}" if known or not untimed else f", time left unknown{more}"

    def typical_seconds(self, phase: str) -> float | None:
        """The median duration of this session's rounds of ``phase``, None before one is timed.

        The session's first round is left out: it loads the model and embeds
        every site's records, and would make the estimate many times too long.
        """
        later = [s for r, s in self.seconds.items() if r != self.first_round and self.phase_of(r) == phase]
        return statistics.median(later) if later else None


def describe_counts(counts: RoundCounts) -> str:
    """``3 of 3 sites answered: 2 trained, 1 skipped (site-2: privacy budget: ...)``."""
    text = f"{counts.answered} of {counts.sites} sites answered: {counts.trained} trained"
    for word, sites in (
        ("skipped", counts.skipped),
        ("refused", counts.refused),
        ("rejected", counts.rejected),
        ("failed", counts.failed),
    ):
        if sites:
            text += f", {len(sites)} {word} ({name_reasons(sites)})"
    return text


def name_reasons(reasons: Mapping[str, str]) -> str:
    """``site-1, site-2: reason`` grouped by reason; at most three reasons and MANY_SITES names each."""
    by_reason: dict[str, list[str]] = {}
    for site, reason in sorted(reasons.items()):
        by_reason.setdefault(reason, []).append(site)
    shown = []
    for reason, sites in list(by_reason.items())[:3]:
        names = ", ".join(sites[:MANY_SITES]) + (
            f" and {len(sites) - MANY_SITES} more" if len(sites) > MANY_SITES else ""
        )
        shown.append(f"{names}: {reason}")
    if len(by_reason) > 3:
        shown.append(f"{len(by_reason) - 3} other reasons")
    return "; ".join(shown)


def site_accuracies(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each evaluated site's accuracy in a round's rows."""
    return {r["site"]: float(r["accuracy"]) for r in rows if r.get("accuracy") is not None}


def mean_accuracy(rows: Sequence[Mapping[str, Any]]) -> float:
    """The unweighted mean accuracy over the sites evaluated in a round's rows; NaN when none was."""
    accuracies = site_accuracies(rows)
    return sum(accuracies.values()) / len(accuracies) if accuracies else math.nan


def describe_accuracy(rows: Sequence[Mapping[str, Any]]) -> str:
    """``mean accuracy 0.918 (site-0 0.934, ...)``, or its range over the sites when there are many."""
    accuracies = site_accuracies(rows)
    if not accuracies:
        return "not evaluated"
    return f"mean accuracy {mean_accuracy(rows):.3f} ({per_site(accuracies, '{:.3f}')})"


def describe_epsilon(rows: Sequence[Mapping[str, Any]], target: float) -> str:
    """``epsilon of 8.0: site-0 3.82, ...``: each site's spent budget (its range when there are many)."""
    spent = {r["site"]: float(r["epsilon"]) for r in rows if r.get("epsilon") is not None}
    if not spent:
        return ""
    return f"epsilon of {target:g}: {per_site(spent, '{:.2f}')}"


def per_site(values: Mapping[str, float], form: str) -> str:
    """Each site's value, or ``min .. max over N sites`` above MANY_SITES."""
    if len(values) > MANY_SITES:
        low, high = min(values.values()), max(values.values())
        return f"{form.format(low)} .. {form.format(high)} over {len(values)} sites"
    return ", ".join(f"{site} {form.format(value)}" for site, value in sorted(values.items()))


def describe_bytes(rows: Sequence[Mapping[str, Any]]) -> str:
    """``0.92 MB up, 1.85 MB down`` for the round (all sites)."""
    up = sum(int(r.get("bytes_up") or 0) for r in rows)
    down = sum(int(r.get("bytes_down") or 0) for r in rows)
    return f"{up / 1e6:.2f} MB up, {down / 1e6:.2f} MB down"


def clock(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``2 h 10 min``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def where_in_run(round_config: Mapping[str, Any]) -> str:
    """A round's phase and experience in words from its round config: ``lora`` or ``probe, experience 2 of 3``."""
    phase = str(round_config.get("phase", ""))
    if "experience" not in round_config:
        return phase
    slot, experiences = int(round_config["experience"]), int(round_config.get("num-experiences", 0))
    position = f"experience {slot + 1} of {experiences}" if slot < experiences else f"slot {slot + 1} (late sites)"
    return f"{phase}, {position}"
