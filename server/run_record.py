"""A finished (or interrupted) run read back from its run directory alone: config, rows, summary.

The report (``server/report_page.py``), the comparison of runs
(``server/run_comparison.py``) and TensorBoard's event files all read a run
through :func:`read_run`, so they need nothing but the folder a run wrote.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.run_report import rows_in_force

RUN_FILES = "a run directory holds config.json and metrics.jsonl from its first round on, and summary.json once it ends"


class NotARunDirectory(ValueError):
    """The folder is not a fedcl run directory (or its files cannot be read)."""


@dataclass(frozen=True)
class RunRecord:
    """What one run directory says about its run.

    ``site_rows``: one row per site per round (``metrics.jsonl``, the rows a
    resume superseded left out); ``experience_rows``: the continual run's row
    after each experience; ``events``: resume markers and failed rounds;
    ``summary``: summary.json, or None for a run that has not ended.
    """

    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    site_rows: list[dict[str, Any]]
    experience_rows: list[dict[str, Any]]
    events: list[dict[str, Any]]

    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.run_dir.name

    @property
    def sites(self) -> list[str]:
        """The sites that appear in the rows, in natural order (site-2 before site-10)."""
        return sorted({r["site"] for r in self.site_rows}, key=natural_key)

    @property
    def rounds(self) -> list[int]:
        """The rounds that have rows, in order."""
        return sorted({int(r["round"]) for r in self.site_rows})

    @property
    def dp(self) -> bool:
        """True if the run trained with differential privacy."""
        return bool(self.config.get("dp", False))

    @property
    def target_epsilon(self) -> float | None:
        """Each site's budget (the run's default; a real site may set its own), None without DP."""
        return float(self.config["target-epsilon"]) if self.dp and "target-epsilon" in self.config else None

    def site_budgets(self) -> dict[str, float]:
        """Each site's own budget as it reported it (a real site sets its own), else the run's; empty without DP."""
        if not self.dp:
            return {}
        reported = self.latest("target_epsilon")
        default = self.target_epsilon
        return {site: reported.get(site, default) for site in self.sites if site in reported or default is not None}

    def per_site(self, key: str, skip_failed_rounds: bool = False) -> dict[str, list[tuple[int, float]]]:
        """Each site's ``(round, value)`` pairs of a numeric row field, rounds without a value left out
        (and failed rounds, whose model the server did not change, with ``skip_failed_rounds``)."""
        series: dict[str, list[tuple[int, float]]] = {site: [] for site in self.sites}
        for row in self.site_rows:
            if skip_failed_rounds and row.get("round_status") == "failed":
                continue
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                series[row["site"]].append((int(row["round"]), float(value)))
        return {site: sorted(points) for site, points in series.items()}

    def latest(self, key: str) -> dict[str, Any]:
        """Each site's last non-null value of a row field (a site missing from the last round keeps its earlier one)."""
        found: dict[str, Any] = {}
        for row in sorted(self.site_rows, key=lambda r: int(r["round"])):
            if row.get(key) is not None:
                found[row["site"]] = row[key]
        return found

    def mean_accuracy(self) -> list[tuple[int, float]]:
        """The mean over sites of each round's evaluation accuracy (failed rounds left out)."""
        by_round: dict[int, list[float]] = {}
        for row in self.site_rows:
            if row.get("accuracy") is not None and row.get("round_status") != "failed":
                by_round.setdefault(int(row["round"]), []).append(float(row["accuracy"]))
        return [(r, sum(v) / len(v)) for r, v in sorted(by_round.items())]

    def round_sums(self, key: str) -> list[tuple[int, float]]:
        """A numeric row field summed over the sites of each round (bytes, for example)."""
        sums: dict[int, float] = {}
        for row in self.site_rows:
            sums[int(row["round"])] = sums.get(int(row["round"]), 0.0) + float(row.get(key) or 0)
        return sorted(sums.items())

    def final_epsilon(self) -> dict[str, float]:
        """Each site's epsilon at the end: summary.json's privacy block, else its last reported row."""
        privacy = (self.summary or {}).get("privacy") or {}
        if privacy:
            return {
                site: float(entry["epsilon"]) for site, entry in privacy.items() if entry.get("epsilon") is not None
            }
        return {site: float(value) for site, value in self.latest("epsilon").items()}

    def accuracy_matrix(self) -> list[list[float | None]]:
        """The continual run's accuracy matrix R[i][j] (row i: after experience i), empty for a plain run."""
        continual = (self.summary or {}).get("continual") or {}
        if continual.get("accuracy_matrix"):
            return [list(row) for row in continual["accuracy_matrix"]]
        return [list(row["accuracy"]) for row in self.experience_rows]

    def continual_scores(self) -> dict[str, float | None]:
        """Average accuracy, forgetting and BWT after the last experience (empty for a plain run)."""
        continual = (self.summary or {}).get("continual") or {}
        source = continual or (self.experience_rows[-1] if self.experience_rows else {})
        return {key: source.get(key) for key in ("average_accuracy", "forgetting", "bwt") if source}

    def problems(self) -> list[dict[str, Any]]:
        """Every round in which a site was skipped, refused, rejected, failed or missing, or the round failed."""
        found = [
            {"round": r["round"], "site": r["site"], "status": r["train_status"], "reason": r.get("train_reason", "")}
            for r in self.site_rows
            if r.get("train_status") not in (None, "trained")
        ]
        found += [
            {
                "round": e["round"],
                "site": ", ".join(e.get("unusable_sites") or []),
                "status": "round failed",
                "reason": e.get("reason", ""),
            }
            for e in self.events
            if e.get("event") == "round-failed"
        ]
        return sorted(found, key=lambda p: (p["round"], natural_key(p["site"])))


def natural_key(name: str) -> tuple:
    """Sort key that puts ``site-2`` before ``site-10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def read_run(run_dir: Path | str) -> RunRecord:
    """Read a run directory; raises NotARunDirectory, naming the folder and what is missing, for anything else."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise NotARunDirectory(f"{run_dir} is not a folder; give the run directory a run printed ({RUN_FILES})")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise NotARunDirectory(f"{run_dir} is not a fedcl run directory: it has no metrics.jsonl ({RUN_FILES})")
    summary = read_json(run_dir / "summary.json")
    config = read_json(run_dir / "config.json") or (summary or {}).get("config")
    if config is None:
        raise NotARunDirectory(f"{run_dir} has metrics.jsonl but neither config.json nor summary.json ({RUN_FILES})")
    rows = []
    lines = metrics.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # a last line cut short by a crash: the rows before it stand
            raise NotARunDirectory(f"{metrics} line {number} is not JSON ({err.msg}); the file is damaged") from None
    rows = rows_in_force(rows)
    return RunRecord(
        run_dir=run_dir.resolve(),
        config=dict(config),
        summary=summary,
        site_rows=[r for r in rows if "site" in r and "round" in r],
        experience_rows=[
            r for r in rows if "site" not in r and "experience" in r and isinstance(r.get("accuracy"), list)
        ],
        events=[r for r in rows if "event" in r],
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None if the file does not exist. Raises NotARunDirectory if it is damaged."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise NotARunDirectory(f"{path} cannot be read as JSON ({err}); the run directory is damaged") from None
    if not isinstance(value, dict):
        raise NotARunDirectory(f"{path} does not hold a JSON object; the run directory is damaged")
    return value
