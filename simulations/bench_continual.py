"""Benchmark: continual-learning baselines at epsilon 8 on MedQuAD and CLINC150, through real `flwr run`.

For each scenario it runs, one after the other, the recipes of the README's
"Continual learning" section and reads each run's ``summary.json``:

- ``naive``: sequential private probe, no replay, no EWC;
- ``replay``: + a replay buffer per site (its records re-enter DP-SGD's pool);
- ``ewc``: + EWC (private importances in the ledger, penalty after noise);
- ``replay+ewc``: both;
- ``joint``: every experience at once, same rounds and budget (private upper bound);
- ``joint non-private``: the same with ``dp = false``;
- ``joint LoRA non-private``: LoRA and head fine-tuned on everything without DP, to a plateau (a converged reference);
- ``converged logistic regression (non-private)``: scikit-learn on the same splits' frozen features
  (``simulations/bench_private_heads.py``; skip with ``--no-reference``);
- ``ncm``: federated private nearest-class-mean (one Gaussian release per experience);
- ``lora replay+ewc`` (``--with-lora``): replay+ewc with one private LoRA round per experience after the probe.

Prints a Markdown table per scenario (average accuracy over every experience
after the last one, average forgetting, the largest site epsilon, wall time)
and writes JSON (``--out``, default ``runs/bench_continual.json``) after every
run, so a partial benchmark keeps what it finished.

Usage: ``python -m simulations.bench_continual [--scenarios medquad clinc150] [--only NAME ...] [--repeats N]
[--with-lora]``. Private runs draw fresh noise from the operating system, so a
recipe's numbers vary from run to run: ``--repeats`` runs each recipe N times
and the table shows the mean and the range.
The scenarios' sizes are capped so the whole benchmark takes about half an
hour on 2 CPU cores; the accountant is RDP (cheaper to evaluate than PRV on
long ledgers; its bound is looser, so the private rows are if anything
pessimistic).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean
from typing import Any

MEDQUAD_GROUPS = (
    "information,frequency,research,outlook,stages;"
    "symptoms,treatment,causes,susceptibility,complications;"
    "inheritance,genetic changes,exams and tests,considerations,prevention,support groups"
)
COMMON = (  # every recipe trains the probe unless its own keys say otherwise (ncm: recipe='ncm' overrides it)
    "target-epsilon=8.0 accountant='rdp' recipe='probe-then-lora' num-rounds=0 probe-rounds=2 probe-steps=30 probe-batch-size=64 "
    "probe-learning-rate=0.5"
)
SCENARIOS: dict[str, dict[str, Any]] = {
    "medquad": {
        "what": "MedQuAD answers -> question type; 3 sites = the 3 largest NIH sources; 3 class-incremental "
        "experiences of question types",
        "keys": (
            "dataset='../shared/data/medquad/medquad.csv' text-column='answer' label-column='qtype' "
            "group-column='source' partition='group' num-sites=3 max-train-examples=240 max-test-examples=80 "
            f"stream='class-incremental' stream-groups='{MEDQUAD_GROUPS}'"
        ),
        "replay": 80,
        "ewc": 10.0,
    },
    "clinc150": {
        "what": "CLINC150 intents; 3 IID sites; 5 class-incremental experiences of 2 domains each (seeded)",
        "keys": (
            "dataset='../shared/data/clinc150/data_full.json' partition='iid' num-sites=3 max-length=32 "
            "max-train-examples=450 max-test-examples=150 stream='class-incremental' stream-by='group' "
            "num-experiences=5"
        ),
        "replay": 90,
        "ewc": 10.0,
    },
    "clinc150-large": {
        "what": "the same CLINC150 stream with 3.3x the records per site (10 train records per intent per site)",
        "keys": (
            "dataset='../shared/data/clinc150/data_full.json' partition='iid' num-sites=3 max-length=32 "
            "max-train-examples=1500 max-test-examples=300 stream='class-incremental' stream-by='group' "
            "num-experiences=5"
        ),
        "replay": 300,
        "ewc": 10.0,
    },
}


def recipes(scenario: dict[str, Any], with_lora: bool) -> dict[str, str]:
    """The run-config overrides of every recipe for a scenario."""
    replay, ewc = f"replay-size={scenario['replay']}", f"ewc-lambda={scenario['ewc']}"
    table = {
        "naive": "",
        "replay": replay,
        "ewc": ewc,
        "replay+ewc": f"{replay} {ewc}",
        "joint": "joint=true",
        "joint non-private": "joint=true dp=false",
        # LoRA and head fine-tuned on everything at once without DP (AdamW), long enough to plateau: the reference
        # the private rows are measured against (the probe row above stops after 2 x 30 steps)
        "joint LoRA non-private": "joint=true dp=false num-rounds=4 local-steps=25 batch-size=32 learning-rate=0.002",
        "ncm": "recipe='ncm'",
    }
    if with_lora:
        table["lora replay+ewc"] = f"{replay} {ewc} num-rounds=1 local-steps=5 batch-size=32 learning-rate=0.05"
    return table


def run_recipe(scenario: str, name: str, overrides: str, out_root: Path, repeat: int = 0) -> dict[str, Any]:
    """Run one recipe end to end (``repeat`` > 0: another run of it, in its own folder) and read its summary."""
    from simulations.run import fresh_run, largest_epsilon, parse_overrides

    keys = f"{COMMON} {SCENARIOS[scenario]['keys']} {overrides}".strip()
    folder = out_root / f"{scenario}-{name.replace(' ', '-').replace('+', '-')}{f'-r{repeat}' if repeat else ''}"
    merged = {  # a recipe's keys override the common ones
        **parse_overrides(COMMON),
        **parse_overrides(SCENARIOS[scenario]["keys"]),
        **parse_overrides(overrides),
    }
    run = fresh_run(merged, folder)
    continual = run.summary["continual"]
    return {
        "scenario": scenario,
        "recipe": name,
        "repeat": repeat,
        "overrides": keys,
        "average_accuracy": continual["average_accuracy"],
        "forgetting": continual["forgetting"],
        "bwt": continual["bwt"],
        "accuracy_matrix": continual["accuracy_matrix"],
        "epsilon_max": largest_epsilon(run.summary),
        "wall_seconds": run.wall_seconds,
        "run_dir": str(run.run_dir),
    }


def converged_reference(scenario: str) -> dict[str, Any] | None:
    """The non-private joint logistic regression on the same splits' frozen features, trained to convergence.

    From ``simulations/bench_private_heads.py`` (scikit-learn, C chosen on a
    validation split of the training records); None for a scenario it does not know.
    """
    from simulations.bench_private_heads import ROWS, load_scenario, run_row, validation_scenario
    from simulations.bench_private_heads import SCENARIOS as HEAD_SCENARIOS

    if scenario not in HEAD_SCENARIOS:
        return None
    started = time.time()
    test = load_scenario(scenario)
    row = run_row(ROWS[0], test, validation_scenario(test), None, 1)
    return {
        "scenario": scenario,
        "recipe": "converged logistic regression (non-private)",
        "repeat": 0,
        "overrides": f"frozen features, C = {row['params'].get('c')}",
        "average_accuracy": row["accuracy"],
        "forgetting": None,
        "epsilon_max": None,
        "wall_seconds": time.time() - started,
    }


def averaged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per recipe: the mean (and spread, over repeats) of its runs, in first-run order."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        merged.setdefault(r["recipe"], []).append(r)
    out = []
    for recipe, runs in merged.items():
        accuracy = [r["average_accuracy"] for r in runs]
        forgetting = [r["forgetting"] for r in runs]
        epsilons = [r["epsilon_max"] for r in runs if r["epsilon_max"] is not None]
        out.append(
            {
                "recipe": recipe,
                "runs": len(runs),
                "average_accuracy": mean(accuracy),
                "accuracy_spread": (min(accuracy), max(accuracy)),
                "forgetting": None if None in forgetting else mean(forgetting),
                "forgetting_spread": None if None in forgetting else (min(forgetting), max(forgetting)),
                "epsilon_max": max(epsilons) if epsilons else None,
                "wall_seconds": mean([r["wall_seconds"] for r in runs]),
            }
        )
    return out


def _cell(value: float | None, spread: tuple[float, float] | None, runs: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ({spread[0]:.3f}-{spread[1]:.3f})" if runs > 1 and spread else "")


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of one scenario's results (means over repeats, with their range)."""
    lines = [
        "| recipe | runs | average accuracy | forgetting | max site epsilon | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in averaged(rows):
        epsilon = "no DP" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}"
        lines.append(
            f"| {r['recipe']} | {r['runs']} | {_cell(r['average_accuracy'], r['accuracy_spread'], r['runs'])} "
            f"| {_cell(r['forgetting'], r['forgetting_spread'], r['runs'])} | {epsilon} | "
            f"{r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals for one scenario, checked on its rows."""
    rows = averaged(rows)
    by = {r["recipe"]: r for r in rows}
    found: dict[str, Any] = {}
    if "naive" in by and "replay+ewc" in by:
        found["replay+ewc forgetting <= half of naive"] = (
            by["replay+ewc"]["forgetting"] <= 0.5 * by["naive"]["forgetting"]
        )
    trained = [r for r in rows if r["recipe"] not in ("ncm", "joint", "joint non-private", "joint LoRA non-private")]
    trained = [r for r in trained if r["epsilon_max"] is not None]
    if trained and "ncm" in by:
        best = max(trained, key=lambda r: r["average_accuracy"])
        found["best private recipe"] = best["recipe"]
        found["best private >= private ncm"] = best["average_accuracy"] >= by["ncm"]["average_accuracy"]
    private = [r for r in rows if r["epsilon_max"] is not None and r["recipe"] != "joint"]
    if private:
        best_private = max(private, key=lambda r: r["average_accuracy"])
        found["best private continual recipe"] = best_private["recipe"]
        for reference in ("converged logistic regression (non-private)", "joint LoRA non-private"):
            if reference in by:
                gap = by[reference]["average_accuracy"] - best_private["average_accuracy"]
                found[f"gap to {reference} (points)"] = round(100 * gap, 1)
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios' recipes one after the other; print the tables and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--only", nargs="*", default=None, help="recipes to run (default: all)")
    parser.add_argument("--with-lora", action="store_true", help="also run replay+ewc with a private LoRA round")
    parser.add_argument("--repeats", type=int, default=1, help="runs per recipe (private runs draw fresh noise)")
    parser.add_argument("--out", default="runs/bench_continual.json")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the converged logistic-regression reference row"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for scenario in args.scenarios:
        if not args.no_reference:
            reference = converged_reference(scenario)
            if reference is not None:
                results.append(reference)
        chosen = [
            (name, overrides)
            for name, overrides in recipes(SCENARIOS[scenario], args.with_lora).items()
            if not args.only or name in args.only
        ]
        for (name, overrides), repeat in ((recipe, k) for recipe in chosen for k in range(args.repeats)):
            print(f"bench_continual: {scenario} / {name} (run {repeat + 1}) ...", flush=True)
            try:
                results.append(run_recipe(scenario, name, overrides, out.parent / "bench_continual", repeat))
            except (RuntimeError, ValueError) as err:  # one failed run must not lose the others
                print(f"bench_continual: {scenario} / {name} failed: {err}", flush=True)
                results.append({"scenario": scenario, "recipe": name, "repeat": repeat, "error": str(err)})
            done = [r for r in results if "error" not in r]
            report = {
                "scenarios": {s: SCENARIOS[s]["what"] for s in args.scenarios},
                "common": COMMON,
                "results": results,
                "goals": {s: goals([r for r in done if r["scenario"] == s]) for s in args.scenarios},
            }
            out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    for scenario in args.scenarios:
        rows = [r for r in results if r["scenario"] == scenario and "error" not in r]
        print(f"\n{scenario}: {SCENARIOS[scenario]['what']}\n{table(rows)}\ngoals: {goals(rows)}")
        run_dirs = [r["run_dir"] for r in rows if r.get("run_dir")]
        if len(run_dirs) >= 2:  # the recipes' curves overlaid, and one page (`fedcl compare`)
            from server.run_comparison import compare_runs

            compared = compare_runs(run_dirs, out.parent / "bench_continual" / f"{scenario}-comparison")
            print(f"curves: {compared.folder / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
