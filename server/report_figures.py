"""The report's PNG figures, drawn with matplotlib from a RunRecord alone.

Figures are drawn on matplotlib's object API (``Figure`` + the Agg canvas),
not pyplot: no global figure state, no backend chosen at import time, safe in
the ServerApp's process. Each function writes one PNG and returns a
:class:`Figure` naming it and saying how to read it; it returns None when the
run has nothing to draw (no DP, not a continual run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.run_record import RunRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as MplFigure

MANY_SITES = 12  # above this the per-site lines become a band (min..max) around the mean
DPI = 110


@dataclass(frozen=True)
class Figure:
    """One PNG of the report: its file name, title and how to read it."""

    file: str
    title: str
    how_to_read: str


def new_axes(width: float = 7.0, height: float = 3.6) -> tuple[MplFigure, Axes]:
    """A figure with one set of axes on the Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.ticker import MaxNLocator

    figure = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.grid(True, alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    return figure, axes


def save(figure: MplFigure, path: Path) -> None:
    """Write the figure as PNG (white background, so it reads in dark-mode viewers too)."""
    figure.savefig(path, format="png", facecolor="white")


def mark_experiences(axes: Axes, record: RunRecord) -> None:
    """Dotted vertical lines where a continual run's experiences end."""
    for row in record.experience_rows:
        axes.axvline(row["round"] + 0.5, color="grey", linestyle=":", linewidth=1)


def plot_per_site(axes: Axes, series: dict[str, list[tuple[int, float]]]) -> None:
    """One thin line per site, or a min..max band when there are many sites."""
    if len(series) <= MANY_SITES:
        for site, points in series.items():
            if points:  # a "$" in a site's name would start matplotlib's maths mode
                axes.plot(*zip(*points), marker=".", linewidth=1, label=site.replace("$", r"\$"))
        return
    by_round: dict[int, list[float]] = {}
    for points in series.values():
        for r, v in points:
            by_round.setdefault(r, []).append(v)
    rounds = sorted(by_round)
    axes.fill_between(
        rounds,
        [min(by_round[r]) for r in rounds],
        [max(by_round[r]) for r in rounds],
        alpha=0.25,
        label=f"{len(series)} sites (min to max)",
    )


def accuracy_figure(record: RunRecord, folder: Path) -> Figure | None:
    """Accuracy per site and its mean over rounds."""
    series = record.per_site("accuracy", skip_failed_rounds=True)  # as the mean: failed rounds changed nothing
    mean = record.mean_accuracy()
    if not mean:
        return None
    figure, axes = new_axes()
    plot_per_site(axes, series)
    axes.plot(*zip(*mean), color="black", linewidth=2.2, label="mean")
    mark_experiences(axes, record)
    axes.set(
        xlabel="round",
        ylabel="accuracy",
        ylim=(0, 1.02),
        title="Accuracy of the global model on each site's test split",
    )
    axes.legend(loc="lower right", fontsize="small", ncols=2)
    save(figure, folder / "accuracy.png")
    return Figure(
        "accuracy.png",
        "Accuracy per site over rounds",
        "Each thin line is one site: the share of its held-out test records the global model labels correctly "
        "after that round; the thick black line is their mean. A continual run's dotted lines mark the end of an "
        "experience: from there on a site is tested on every experience seen so far, so a drop there is forgetting "
        "or a harder test, not a broken round.",
    )


def epsilon_figure(record: RunRecord, folder: Path) -> Figure | None:
    """Epsilon spent per site over rounds, with the budget line."""
    budgets = record.site_budgets()
    series = record.per_site("epsilon")
    if not budgets or not any(series.values()):
        return None
    figure, axes = new_axes()
    plot_per_site(axes, series)
    for budget in sorted(set(budgets.values())):  # sites that set their own budgets get a line each
        sites = [site for site, value in budgets.items() if value == budget]
        whose = "" if len(sites) == len(budgets) else f" ({', '.join(sites[:3])}{', ...' if len(sites) > 3 else ''})"
        axes.axhline(budget, color="crimson", linestyle="--", linewidth=1.5, label=f"budget {budget:g}{whose}")
    mark_experiences(axes, record)
    top = max(max(budgets.values()), max((v for points in series.values() for _, v in points), default=0))
    axes.set(xlabel="round", ylabel="epsilon spent", ylim=(0, top * 1.1), title="Privacy budget spent by each site")
    axes.legend(loc="lower right", fontsize="small", ncols=2)
    save(figure, folder / "epsilon.png")
    delta = record.config.get("delta")
    return Figure(
        "epsilon.png",
        "Epsilon per site over rounds, against the budget",
        f"Each line is one site's epsilon (at delta {delta}) for everything it has released so far, over its whole "
        "life (earlier runs included), as its own privacy ledger counts it. It only grows. The dashed red line is "
        "the budget: a site never passes it, and one that reaches it stops training (the list of rounds in which a "
        "site did not train says when). The first value is high because the site's privacy filter prices every "
        "round at one order fixed for its whole plan; a site whose plan ran to the end finishes at or just under "
        "the budget.",
    )


def accuracy_matrix_figure(record: RunRecord, folder: Path) -> Figure | None:
    """The continual run's accuracy matrix as a heatmap, its scores in the title."""
    matrix = record.accuracy_matrix()
    if not matrix:
        return None
    import numpy as np

    size = max(len(row) for row in matrix)
    grid = np.full((len(matrix), size), np.nan)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                grid[i, j] = value
    figure, axes = new_axes(width=min(2.2 + 0.9 * size, 9), height=min(1.6 + 0.7 * len(matrix), 8))
    axes.grid(False)
    image = axes.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                axes.text(
                    j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="white" if grid[i, j] < 0.6 else "black"
                )
    axes.set_xticks(range(size), [f"exp {j}" for j in range(size)])
    axes.set_yticks(range(len(matrix)), [f"after {i}" for i in range(len(matrix))])
    axes.set(xlabel="tested on experience", ylabel="trained through experience")
    scores = record.continual_scores()
    axes.set_title(
        "  ".join(
            f"{name} {scores[key]:.3f}"
            for key, name in (("average_accuracy", "avg acc"), ("forgetting", "forgetting"), ("bwt", "BWT"))
            if scores.get(key) is not None
        ),
        fontsize="medium",
    )
    figure.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    save(figure, folder / "accuracy_matrix.png")
    return Figure(
        "accuracy_matrix.png",
        "Accuracy matrix (continual learning)",
        "Row i is the global model after experience i; column j is its accuracy on experience j's test records, "
        "all sites pooled. Below the diagonal is memory of earlier experiences, the diagonal the newest one. Average "
        "accuracy is the last row's accuracy over all test records seen so far; forgetting is, per earlier "
        "experience, its accuracy just after it was learned (the diagonal) minus its last one, averaged (Avalanche's "
        "definition; lower is better); BWT is minus the forgetting (negative means the model forgot).",
    )


def bytes_figure(record: RunRecord, folder: Path) -> Figure | None:
    """Bytes sent to and received from the sites per round."""
    up, down = record.round_sums("bytes_up"), record.round_sums("bytes_down")
    if not any(v for _, v in up + down):
        return None
    figure, axes = new_axes(height=3.0)
    rounds = [r for r, _ in up]
    axes.bar([r - 0.2 for r in rounds], [v / 1e6 for _, v in down], width=0.4, label="to sites")
    axes.bar([r + 0.2 for r in rounds], [v / 1e6 for _, v in up], width=0.4, label="from sites")
    axes.set(xlabel="round", ylabel="MB", title="Traffic per round, all sites together")
    axes.legend(fontsize="small")
    save(figure, folder / "bytes.png")
    return Figure(
        "bytes.png",
        "Bytes per round",
        "What the server sent to all sites (the global state, for training and for evaluation) and what came back "
        "(each site's noised release), in megabytes: adapter weights and the small head, or with the ncm recipe "
        "class sums; never the base model or any record.",
    )


def draw_figures(record: RunRecord, folder: Path) -> list[Figure]:
    """Write every figure the run has data for into ``folder``; returns them in page order."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = [
        accuracy_figure(record, folder),
        epsilon_figure(record, folder),
        accuracy_matrix_figure(record, folder),
        bytes_figure(record, folder),
    ]
    return [figure for figure in figures if figure is not None]
