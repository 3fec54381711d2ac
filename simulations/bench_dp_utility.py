"""Benchmark: the default scenario with and without DP, and the plain recipe, through real `flwr run`.

Prints a table and writes JSON (``--out``, default ``runs/bench_dp_utility.json``):
final mean accuracy, wall time and each site's final epsilon for

- ``private``: the default (DP at epsilon 8, probe-then-lora),
- ``non-private``: the same recipe with ``dp = false``,
- ``plain non-private``: LoRA + head from round 1, AdamW, no DP (``recipe = lora``),
- ``plain private``: the same plain recipe under DP-SGD at epsilon 8 (the recipe that collapses),
- ``private, CLS pooler`` / ``non-private, CLS pooler``: the default recipe on the checkpoint's own
  head (``pooling = "model"``: BERT's first-token pooler) instead of mean pooling.

Usage: ``python -m simulations.bench_dp_utility [--only NAME ...] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = {
    "private": "",
    "non-private": "dp=false",
    "plain non-private": "dp=false recipe='lora' num-rounds=3",
    "plain private": "recipe='lora' num-rounds=3",
    "private, CLS pooler": "pooling='model'",
    "non-private, CLS pooler": "pooling='model' dp=false",
}


def run_variant(name: str, overrides: str, out_root: Path) -> dict:
    """Run one variant end to end and read its summary."""
    from simulations.run import fresh_run, parse_overrides

    run = fresh_run(parse_overrides(overrides), out_root / name.replace(" ", "-").replace(",", ""))
    privacy = run.summary.get("privacy") or {}
    return {
        "variant": name,
        "overrides": overrides,
        "accuracy": run.summary["accuracy"],
        "per_site": {site: v["accuracy"] for site, v in run.summary["per_site"].items()},
        "epsilon": {site: p["epsilon"] for site, p in privacy.items()},
        "wall_seconds": run.wall_seconds,
        "run_dir": str(run.run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the variants one after the other and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), help="variants to run")
    parser.add_argument("--out", default="runs/bench_dp_utility.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = []
    for name in args.only:
        results.append(run_variant(name, VARIANTS[name], out.parent / "bench_dp_utility"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2), encoding="utf-8")
        row = results[-1]
        print(
            f"{name:<24} accuracy {row['accuracy']:.3f}  wall {row['wall_seconds']:.0f} s  "
            f"epsilon {max(row['epsilon'].values(), default=0.0):.2f}",
            flush=True,
        )
    print("\n| variant | final mean accuracy | wall seconds | max site epsilon |\n|---|---|---|---|")
    for row in results:
        eps = f"{max(row['epsilon'].values()):.2f}" if row["epsilon"] else "-"
        print(f"| {row['variant']} | {row['accuracy']:.3f} | {row['wall_seconds']:.0f} | {eps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
