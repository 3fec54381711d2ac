"""Several runs side by side: one table and overlaid curves, from their run directories alone.

``fedcl compare RUN_DIR RUN_DIR ... --out DIR`` writes into DIR:
``comparison.md`` (the table, also printed), ``comparison.json`` (the same
rows), ``accuracy.png`` (each run's mean accuracy over rounds),
``epsilon.png`` (each DP run's largest site epsilon over rounds) and
``index.html`` showing them together. A benchmark's baselines, for example,
are its row folders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.report_figures import new_axes, save
from server.report_page import STYLE, esc, recipe_of, table
from server.run_record import RunRecord, read_run

COLUMNS = (
    ("run", "run"),
    ("status", "status"),
    ("recipe", "recipe"),
    ("budget", "epsilon budget"),
    ("accuracy", "final accuracy"),
    ("max_epsilon", "largest epsilon"),
    ("average_accuracy", "average accuracy"),
    ("forgetting", "forgetting"),
    ("bwt", "BWT"),
    ("rounds", "rounds"),
    ("wall_seconds", "wall s"),
    ("mb_up", "MB up"),
)


@dataclass(frozen=True)
class Comparison:
    """What ``compare_runs`` wrote: the table's rows and the files."""

    rows: list[dict[str, Any]]
    markdown: str
    folder: Path


def run_labels(records: Sequence[RunRecord]) -> list[str]:
    """A short distinct label per run: its folder name, with its parent's name where two names clash."""
    names = [r.name for r in records]
    return [f"{r.run_dir.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in records]


def comparison_row(record: RunRecord, label: str) -> dict[str, Any]:
    """One run's row of the table."""
    summary = record.summary or {}
    epsilons = record.final_epsilon()
    scores = record.continual_scores()
    up = (summary.get("bytes") or {}).get("up_total")
    if up is None:
        up = sum(v for _, v in record.round_sums("bytes_up"))
    return {
        "run": label,
        "status": summary.get("status", "not finished"),
        "recipe": recipe_of(record),
        "budget": record.target_epsilon,
        "accuracy": summary.get("accuracy", (record.mean_accuracy() or [(0, None)])[-1][1]),
        "max_epsilon": max(epsilons.values()) if epsilons and record.dp else None,
        "average_accuracy": scores.get("average_accuracy"),
        "forgetting": scores.get("forgetting"),
        "bwt": scores.get("bwt"),
        "rounds": summary.get("rounds_completed", record.rounds[-1] if record.rounds else 0),
        "wall_seconds": round(float(summary["wall_seconds"]), 1) if summary.get("wall_seconds") is not None else None,
        "mb_up": round(float(up) / 1e6, 2),
        "run_dir": str(record.run_dir),
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (numbers to three decimals, ``-`` for none)."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(cell(row[key]) for key, _ in COLUMNS) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: Sequence[Path | str], out: Path | str) -> Comparison:
    """Read every run, write the table and the overlaid curves into ``out``; returns what was written.

    Raises :class:`~server.run_record.NotARunDirectory` naming the first
    folder that is not a run, ValueError for fewer than two runs.
    """
    if len(run_dirs) < 2:
        raise ValueError(f"compare needs at least two run directories, got {len(run_dirs)}; give two or more")
    records = [read_run(path) for path in run_dirs]
    labels = run_labels(records)
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    rows = [comparison_row(record, label) for record, label in zip(records, labels)]
    markdown = markdown_table(rows)
    (folder / "comparison.md").write_text(markdown, encoding="utf-8")
    (folder / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    figures = overlaid_figures(records, labels, folder)
    page = [
        "<h1>fedcl: runs compared</h1>",
        table([title for _, title in COLUMNS], [[row[key] for key, _ in COLUMNS] for row in rows]),
        *(f'<figure><img src="{esc(name)}" alt="{esc(name)}"></figure>' for name in figures),
        "<p>Run directories: " + ", ".join(f"<code>{esc(row['run_dir'])}</code>" for row in rows) + "</p>",
    ]
    (folder / "index.html").write_text(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>fedcl: runs compared</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(page) + "\n</body></html>\n",
        encoding="utf-8",
    )
    return Comparison(rows, markdown, folder)


def overlaid_figures(records: Sequence[RunRecord], labels: Sequence[str], folder: Path) -> list[str]:
    """accuracy.png (every run's mean accuracy) and, if any run used DP, epsilon.png; returns the file names."""
    written = []
    figure, axes = new_axes()
    for record, label in zip(records, labels):
        mean = record.mean_accuracy()
        if mean:
            axes.plot(*zip(*mean), marker=".", linewidth=1.5, label=label)
    axes.set(xlabel="round", ylabel="mean accuracy over sites", ylim=(0, 1.02), title="Mean accuracy per round")
    axes.legend(fontsize="small")
    save(figure, folder / "accuracy.png")
    written.append("accuracy.png")
    private = [(record, label) for record, label in zip(records, labels) if record.dp]
    if private:
        figure, axes = new_axes()
        for record, label in private:
            by_round: dict[int, float] = {}
            for points in record.per_site("epsilon").values():
                for r, value in points:
                    by_round[r] = max(by_round.get(r, 0.0), value)
            if by_round:
                line = axes.plot(*zip(*sorted(by_round.items())), marker=".", linewidth=1.5, label=label)
                if record.target_epsilon is not None:
                    axes.axhline(record.target_epsilon, color=line[0].get_color(), linestyle="--", linewidth=0.8)
        axes.set(xlabel="round", ylabel="largest site epsilon", title="Privacy spent per round (dashed: budgets)")
        axes.legend(fontsize="small")
        save(figure, folder / "epsilon.png")
        written.append("epsilon.png")
    return written
