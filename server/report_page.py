"""The run's report: one HTML page with its figures, written from the run directory alone.

``write_report(run_dir)`` reads the run (``server/run_record.py``), draws the
figures (``server/report_figures.py``) into ``<run-dir>/report/`` and writes
``<run-dir>/report/index.html`` beside them: what the run was, a privacy
statement in words an ethics board can read, the figures with how to read
each, each site's numbers, every round in which a site did not train, and the
whole configuration. The ServerApp writes it when a run ends; ``fedcl report
RUN_DIR`` writes it again at any time.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from server.report_figures import Figure, draw_figures
from server.run_record import RunRecord, natural_key, read_run

REPORT_FOLDER = "report"
MAX_PROBLEM_ROWS = 200  # a long run with a site that stopped early would list it every round

STYLE = """
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.92rem; }
td, th { border: 1px solid #ccc; padding: 0.25rem 0.55rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status-completed { color: #17692b; } .status-failed, .status-running { color: #a30d0d; }
.box { border-left: 4px solid #2a5db0; background: #f1f5fc; padding: 0.6rem 1rem; margin: 1rem 0; }
.warn { border-left-color: #b02a2a; background: #fcf1f1; }
figure { margin: 1.2rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.92rem; color: #333; } code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def write_report(run_dir: Path | str) -> Path:
    """Write ``<run-dir>/report/index.html`` and its PNG figures; returns the page's path.

    Raises :class:`~server.run_record.NotARunDirectory` (a ValueError) for a
    folder that is not a run directory.
    """
    record = read_run(run_dir)
    folder = record.run_dir / REPORT_FOLDER
    figures = draw_figures(record, folder)
    page = folder / "index.html"
    page.write_text(render_page(record, figures), encoding="utf-8")
    return page


def render_page(record: RunRecord, figures: Sequence[Figure]) -> str:
    """The report page's HTML for ``record`` with ``figures`` (PNG files beside the page)."""
    sections = [
        f"<h1>fedcl run {esc(record.name)}</h1>",
        f"<p>{status_line(record)}</p>",
        "<h2>At a glance</h2>",
        table(["", ""], glance_rows(record), header=False),
        "<h2>Privacy</h2>",
        *privacy_statement(record),
        "<h2>Figures</h2>",
        *(
            f'<figure><img src="{esc(f.file)}" alt="{esc(f.title)}"><figcaption><b>{esc(f.title)}.</b> '
            f"{esc(f.how_to_read)}</figcaption></figure>"
            for f in figures
        ),
        "<h2>Each site</h2>",
        site_table(record),
        "<h2>Rounds in which a site did not train</h2>",
        problems_section(record),
        "<h2>Configuration</h2>",
        configuration_section(record),
    ]
    body = "\n".join(sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>fedcl run {esc(record.name)}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value))


def number(value: Any, digits: int = 3) -> str:
    """A number rounded for a table, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return (
            f"{value:.{digits}g}"
            if abs(value) >= 1000 or (value and abs(value) < 10**-digits)
            else f"{value:.{digits}f}"
        )
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], header: bool = True) -> str:
    """An HTML table; numbers are right-aligned and rounded."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>" if header else ""
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{esc(number(cell))}</td>'
            if isinstance(cell, (int, float)) and not isinstance(cell, bool)
            else f"<td>{esc(number(cell))}</td>"
            for cell in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def status_line(record: RunRecord) -> str:
    """``Status: completed`` (or failed with its reason, or still running / interrupted)."""
    summary = record.summary
    if summary is None:
        rounds = record.rounds[-1] if record.rounds else 0
        return (
            f'Status: <b class="status-running">not finished</b>: no summary.json yet (the run is still going, or '
            f"stopped without ending; {rounds} round(s) have rows). Resume it with "
            f"<code>resume='{esc(record.run_dir)}'</code>."
        )
    status = summary.get("status", "completed")
    reason = f": {esc(summary.get('failure_reason'))}" if summary.get("failure_reason") else ""
    return f'Status: <b class="status-{esc(status)}">{esc(status)}</b>{reason}'


def recipe_of(record: RunRecord) -> str:
    """The recipe the run used (the choice ``auto`` made, when the summary says)."""
    chosen = ((record.summary or {}).get("recipe") or {}).get("chosen")
    return str(chosen or record.config.get("recipe", "?"))


def glance_rows(record: RunRecord) -> list[tuple[str, Any]]:
    """The key facts of the run, as (name, value) pairs."""
    config, summary = record.config, record.summary or {}
    reason = (summary.get("recipe") or {}).get("reason")
    rows: list[tuple[str, Any]] = [
        ("final mean accuracy", summary.get("accuracy")),
        ("measured after round", summary.get("accuracy_round")),
        ("rounds completed", summary.get("rounds_completed", record.rounds[-1] if record.rounds else 0)),
        ("sites", len(record.sites)),
        ("recipe", recipe_of(record) + (f" ({reason})" if reason else "")),
        ("dataset", config.get("dataset")),
        ("model", config.get("model")),
        (
            "differential privacy",
            f"yes: budget epsilon {config.get('target-epsilon')} per site, delta {config.get('delta')}"
            if record.dp
            else "no",
        ),
    ]
    if config.get("stream", "none") != "none":
        plan = ((summary.get("continual") or {}).get("plan") or {}).get("members") or record.accuracy_matrix()
        rows.append(("stream", f"{config.get('stream')} by {config.get('stream-by')}, {len(plan)} experiences"))
        scores = record.continual_scores()
        for key, name in (("average_accuracy", "average accuracy"), ("forgetting", "forgetting"), ("bwt", "BWT")):
            rows.append((name, scores.get(key)))
    if summary.get("wall_seconds") is not None:  # the server's clock over its last session
        label = "wall time since the resume (s)" if summary.get("resumed_from_round") else "wall time (s)"
        rows.append((label, f"{float(summary['wall_seconds']):.1f}"))
    if summary.get("resumed_from_round"):
        rows.append(("resumed after round", summary["resumed_from_round"]))
    return rows


def server_view(record: RunRecord) -> str:
    """What the server saw of the sites' releases, in words: each site's own, or only their sum."""
    if str(record.config.get("secure-aggregation", False)).lower() == "true":
        honest = record.config.get("secagg-min-honest", 0)
        colluders = record.config.get("secagg-max-colluders", 0)
        trust = (
            f"secagg-min-honest = {honest or 'every site'} sites honest and at most secagg-max-colluders = "
            f"{colluders} sites colluding with the server (a sum was unmasked only with at least both together "
            "surviving)"
        )
        if recipe_of(record) == "ncm":
            return (
                "The server saw only the sum of the sites' class sums (secure aggregation); each site added a share "
                f"of the noise, counted as if only {trust}."
            )
        return (
            "The server saw only the weighted sum of the sites' probe and LoRA updates (secure aggregation), "
            f"assuming {trust}; each site's DP-SGD noise is its own, the same as without secure aggregation."
        )
    return (
        "The server sees each site's own noised update (secure aggregation, where it sees only their sum, is "
        "available with secure-aggregation = true)."
    )


def released_by_recipe(record: RunRecord) -> str:
    """What each site sent in words, for the recipe the run used."""
    config = record.config
    if recipe_of(record) == "ncm":
        released = (
            "once per experience, the sum of its training records' features for each class, each record scaled to "
            "norm at most 1 and Gaussian noise added to the sums by the site (the Gaussian mechanism)"
        )
    else:
        released = (
            "in every round, the update of the shared model it trained: the small classifier head in probe rounds, "
            "the LoRA adapters and the head in LoRA rounds, trained with DP-SGD (each record's gradient clipped to "
            f"norm {config.get('max-grad-norm')}, Gaussian noise added to every step's sum)"
        )
    if float(config.get("ewc-lambda") or 0) > 0:
        released += "; its EWC importance estimates go through the same noised gradients"
    return released


def privacy_statement(record: RunRecord) -> list[str]:
    """The privacy section: what was promised, to whom, what left each site, and each site's budget."""
    if not record.dp:
        return [
            '<div class="box warn"><b>This run used no differential privacy.</b> The sites sent their updates '
            "without noise, so nothing in this run is private in the sense of a privacy budget: its numbers are a "
            "non-private reference and must not be presented as private results.</div>"
        ]
    privacy = (record.summary or {}).get("privacy") or privacy_from_rows(record)
    delta = record.config.get("delta")
    budgets = sorted(set(record.site_budgets().values()))
    budget = (
        f"The budget was epsilon {budgets[0]:g} per site"
        if len(budgets) == 1
        else "The sites set their own budgets (epsilon " + ", ".join(f"{b:g}" for b in budgets) + ")"
    )
    spent = record.final_epsilon()
    worst = max(spent.values()) if spent else None
    stopped = sorted(site for site, entry in privacy.items() if entry.get("stopped_for_budget"))
    simulated = (record.run_dir / "site-data").is_dir()
    lines = [
        '<div class="box"><p><b>In plain words.</b> Each site trained on its own records, and what left a site was '
        "noised by the site itself before it left, so that no one who sees everything a site sent (the coordinating "
        "server included) can tell with confidence whether any one training record was in that site's data. The "
        f"strength of that promise is the site's <i>epsilon</i> (smaller is stronger), at a failure probability "
        f"<i>delta</i> of {esc(delta)}. {esc(budget)}; the largest any site reached is {esc(number(worst))}.</p>",
        f"<p><b>What each site released, noised:</b> {esc(released_by_recipe(record))}. {esc(server_view(record))}</p>",
        "<p><b>Sent without noise (declared public, not covered by epsilon):</b> the accuracy, loss and number of "
        "the site's held-out <i>test</i> records; its training-record count as the averaging weight; one-bit "
        "refusals (its records do not fit the federation, its records changed since its state was made, an internal "
        "error), each with a fixed reason; and when it replied. The label names and the experience plan are agreed "
        "in the run configuration, not sent by the sites.</p>",
        "<p><b>One record</b> is one row of a site's training file: a patient with k rows is protected as a group, "
        "at k times the epsilon. The promise is for adding or removing one record when the site declared a public "
        "nominal size (node config <code>nominal-records</code>); a site that did not, as in every simulation, "
        "sends its exact record count, and the promise then holds for replacing one record (about twice the epsilon "
        "for adding or removing one). <b>Who is trusted:</b> each site's own machine and operator. <b>Not "
        "trusted:</b> the server and the other sites. The epsilon below covers each site's whole life in its state "
        "folder (earlier runs and restarts included), as its own ledger counts it (an RDP privacy filter; Opacus' "
        "RDP analysis).</p>",
    ]
    if simulated:
        lines.append(
            "<p><b>This was a simulation:</b> every virtual site ran on this one machine, and the text of every "
            "site's records is in this run directory (<code>site-data/</code>, readable by its owner only). Share "
            "<code>report/</code>, <code>summary.json</code>, <code>metrics.jsonl</code> and <code>config.json</code>, "
            "never the whole folder.</p>"
        )
    if stopped:
        lines.append(
            f"<p><b>Stopped for their budget:</b> {esc(', '.join(stopped))} (they trained no further once it was spent).</p>"
        )
    lines.append("</div>")
    rows = [
        (
            site,
            entry.get("epsilon"),
            entry.get("target_epsilon"),
            entry.get("delta"),
            entry.get("steps"),
            entry.get("noise_multiplier"),
            entry.get("sample_rate"),
            entry.get("max_grad_norm"),
            bool(entry.get("stopped_for_budget")),
        )
        for site, entry in sorted(privacy.items(), key=lambda item: natural_key(item[0]))
    ]
    if rows:
        lines.append(
            table(
                [
                    "site",
                    "epsilon spent",
                    "budget",
                    "delta",
                    "DP steps",
                    "noise multiplier",
                    "sample rate",
                    "clip norm",
                    "stopped for budget",
                ],
                rows,
            )
        )
    return lines


def privacy_from_rows(record: RunRecord) -> dict[str, dict[str, Any]]:
    """summary.json's privacy block rebuilt from the rows, for a run that has not ended (no summary.json yet)."""
    fields = {
        "epsilon": "epsilon",
        "target_epsilon": "target_epsilon",
        "delta": "delta",
        "steps": "dp_steps_total",
        "noise_multiplier": "noise_multiplier",
        "sample_rate": "sample_rate",
        "max_grad_norm": "max_grad_norm",
    }
    latest = {name: record.latest(key) for name, key in fields.items()}
    stopped = {r["site"] for r in record.site_rows if r.get("stopped_for_budget")}
    return {
        site: {**{name: values.get(site) for name, values in latest.items()}, "stopped_for_budget": site in stopped}
        for site in latest["epsilon"]
    }


def site_table(record: RunRecord) -> str:
    """Each site's final accuracy, record counts and epsilon (a site's last reported values)."""
    per_site = (record.summary or {}).get("per_site") or {}
    epsilon = record.final_epsilon()
    accuracy, train, test = record.latest("accuracy"), record.latest("train_examples"), record.latest("test_examples")
    rows = [
        (
            site,
            (per_site.get(site) or {}).get("accuracy", accuracy.get(site)),
            train.get(site),
            test.get(site),
            epsilon.get(site),
        )
        for site in record.sites
    ]
    return table(["site", "final accuracy", "training records", "test records", "epsilon"], rows)


def problems_section(record: RunRecord) -> str:
    """A table of every round in which a site did not train, or 'none'."""
    problems = record.problems()
    if not problems:
        return "<p>None: every site trained in every round.</p>"
    rows = [(p["round"], p["site"], p["status"], p["reason"]) for p in problems[:MAX_PROBLEM_ROWS]]
    more = len(problems) - len(rows)
    note = f"<p>... and {more} more (metrics.jsonl has them all).</p>" if more > 0 else ""
    return table(["round", "site", "what happened", "reason"], rows) + note


def configuration_section(record: RunRecord) -> str:
    """The run configuration (every key), folded."""
    rows = [
        (key, json.dumps(value) if not isinstance(value, str) else value)
        for key, value in sorted(record.config.items())
    ]
    return (
        "<details><summary>Every run-config key this run used (config.json)</summary>"
        + table(["key", "value"], rows)
        + "</details>"
    )
