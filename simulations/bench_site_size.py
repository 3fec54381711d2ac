"""Benchmark: which private head pays at large sites (CLINC150 full, all of MedQuAD), through real `flwr run`.

Each row is one plain run (all labels at once, 3 sites) read back from its ``summary.json``: the private
nearest-class-mean release (``ncm``), the private linear probe alone (``probe``: the default probe settings,
no LoRA round) and the probe followed by private LoRA rounds with large Poisson batches (``probe + LoRA``, the
recipe of Yu et al. 2021 and Li et al. 2021 scaled down to what 2 CPU cores run in minutes), at the same
epsilon per site. Prints a Markdown table (accuracy, the largest site epsilon, wall time) and writes JSON
(``--out``, default ``runs/bench_site_size.json``) after every run.

Usage: ``python -m simulations.bench_site_size [--scenarios clinc150-full medquad-full] [--epsilons 8 2]
[--only ncm probe ...]``. Runtime on 2 CPU cores: about 2 minutes per NCM or probe row (embedding the records once
per run is most of it) and about 15 minutes per LoRA row on CLINC150 full.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SCENARIOS: dict[str, str] = {
    "clinc150-full": (
        "dataset='../shared/data/clinc150/data_full.json' partition='iid' num-sites=3 max-length=32 "
        "max-train-examples=5000 max-test-examples=1500"
    ),
    "medquad-full": (
        "dataset='../shared/data/medquad/medquad.csv' text-column='answer' label-column='qtype' "
        "group-column='source' partition='group' num-sites=3"
    ),
}
RECIPES: dict[str, str] = {
    "ncm": "recipe='ncm'",
    "probe": "recipe='probe-then-lora' num-rounds=0",
    "probe + LoRA": (
        "recipe='probe-then-lora' num-rounds=2 local-steps=8 batch-size=512 learning-rate=0.05 probe-rounds=10"
    ),
}
LORA_SCENARIOS = ("clinc150-full",)  # LoRA at 128 tokens on all of MedQuAD is hours on 2 cores


def run_row(scenario: str, recipe: str, epsilon: float, out_root: Path) -> dict[str, Any]:
    """One plain run of ``recipe`` on ``scenario`` at ``epsilon``; its accuracy, epsilon and wall time."""
    from simulations.run import fresh_run, largest_epsilon, parse_overrides

    keys = f"target-epsilon={epsilon} {SCENARIOS[scenario]} {RECIPES[recipe]}"
    run = fresh_run(parse_overrides(keys), out_root / f"{scenario}-{recipe.replace(' + ', '-')}-eps{epsilon:g}")
    return {
        "scenario": scenario,
        "recipe": recipe,
        "target_epsilon": epsilon,
        "overrides": keys,
        "accuracy": run.summary["accuracy"],
        "epsilon_max": largest_epsilon(run.summary),
        "wall_seconds": run.wall_seconds,
        "run_dir": str(run.run_dir),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| scenario | recipe | target epsilon | accuracy | max site epsilon | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scenario']} | {r['recipe']} | {r['target_epsilon']:g} | failed | | |")
            continue
        spent = "n/a" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}"
        lines.append(
            f"| {r['scenario']} | {r['recipe']} | {r['target_epsilon']:g} | {r['accuracy']:.3f} | {spent} | "
            f"{r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the rows one after the other; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--epsilons", nargs="*", type=float, default=[8.0, 2.0])
    parser.add_argument("--only", nargs="*", default=None, choices=list(RECIPES), help="recipes (default: all)")
    parser.add_argument("--out", default="runs/bench_site_size.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for scenario in args.scenarios:
        for recipe in args.only or list(RECIPES):
            if recipe == "probe + LoRA" and scenario not in LORA_SCENARIOS:
                continue
            for epsilon in args.epsilons:
                print(f"bench_site_size: {scenario} / {recipe} / epsilon {epsilon:g} ...", flush=True)
                try:
                    rows.append(run_row(scenario, recipe, epsilon, out.parent / "bench_site_size"))
                except (RuntimeError, ValueError) as err:  # one failed run must not lose the others
                    print(f"bench_site_size: failed: {err}", flush=True)
                    rows.append({"scenario": scenario, "recipe": recipe, "target_epsilon": epsilon, "error": str(err)})
                out.write_text(json.dumps({"rows": rows}, indent=1), encoding="utf-8")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
