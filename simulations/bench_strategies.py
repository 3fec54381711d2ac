"""Benchmark of the aggregation strategies through real `flwr run` simulations on MedQuAD.

Three parts, printed as tables and written as JSON (``--out``, default
``runs/bench_strategies.json``); every run is ``python -m simulations.run``
with the overrides printed beside it, one after the other:

a. bytes per site per round for each strategy and compression against the
   full model: exact serialised sizes for MiniLM's real tensor shapes with
   MedQuAD's head (``simulations.bench_aggregation``), next to the mean
   ``bytes_up`` the real runs of part b measured;
b. accuracy after a fixed number of rounds, 3 sites (MedQuAD sources), for
   fedavg, ffa and exact, with and without DP-SGD: 5 cheap rounds of the
   linear probe on cached features (the aggregation rules agree there: B = 0),
   then 3 LoRA rounds, where they differ. Plain LoRA from round 1
   (``recipe = "lora"``) was tried first: at the affordable 4-5 rounds every
   rule still predicted the majority class (accuracy 0.29, the same for all),
   so it could not tell the rules apart; under DP it collapses (STACK-NOTES);
c. 5 sites, one of them (``attack-site``) sending a scaled (x100) or
   sign-flipped (x4) update through the simulation-only fault injector
   (client/fault_injection.py), without and with the robust wrapper
   (validate with the default and a tighter norm ratio, coordinate median),
   against the clean run.

Usage::

    python -m simulations.bench_strategies [--parts bytes accuracy attack] [--out PATH] [--dry-run]

A run whose ``summary.json`` already exists under ``--runs`` is read, not
repeated, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from simulations.bench_aggregation import FULL_MODEL_BYTES, byte_rows, minilm_adapter

PROJECT = Path(__file__).resolve().parent.parent
MEDQUAD = (
    "dataset='../shared/data/medquad/medquad.csv' text-column='answer' label-column='qtype' "
    "group-column='source' partition='group'"
)
# Sized for ~2-4 minutes per run on 2 shared cores: an answer's first 32 tokens mostly say what kind of answer it is.
SIZE = (
    "recipe='probe-then-lora' probe-rounds=5 local-steps=5 batch-size=16 max-length=32 "
    "max-train-examples=200 max-test-examples=40"
)
# Without DP the LoRA phase uses AdamW: the default 1e-2 scrambles MiniLM's attention in a few steps (calibration:
# majority class for 4 of 5 rounds), so 2e-3. Under DP the project's default (SGD, momentum 0.9, 1e-2) is kept.
PLAIN_LR, DP_LR = "learning-rate=0.002", "learning-rate=0.01"
IN_PROGRESS_SECONDS = 300  # a run directory whose log changed this recently belongs to a running benchmark
PROBE_ROUNDS = 5  # the probe-rounds of SIZE: the LoRA phase's gain is measured from the end of the probe
MEDQUAD_CLASSES = 16  # qtype values in the whole file (the head is sized to all labels)
ATTACKER = 4  # the smallest of the five source sites: rejecting it costs the least data

ACCURACY_RUNS = {
    f"{strategy}{'-dp' if dp else ''}": f"num-sites=3 num-rounds=3 strategy='{strategy}' dp={str(dp).lower()} "
    f"{DP_LR if dp else PLAIN_LR}"
    for dp in (False, True)
    for strategy in ("fedavg", "ffa", "exact")
}
ATTACK_RUNS = {
    "clean": "robust='validate'",
    "scale-x100-unprotected": f"robust='none' attack='scale' attack-scale=100.0 attack-site={ATTACKER}",
    "scale-x100-validate": f"robust='validate' attack='scale' attack-scale=100.0 attack-site={ATTACKER}",
    "sign-flip-x4-unprotected": f"robust='none' attack='sign-flip' attack-scale=4.0 attack-site={ATTACKER}",
    "sign-flip-x4-median": f"robust='median' attack='sign-flip' attack-scale=4.0 attack-site={ATTACKER}",
    # the x4 update's norm is 4.4-5.5x the median one (honest sites: <= 1.2x): a tighter ratio than the default 10
    "sign-flip-x4-validate-ratio3": f"robust='validate' max-norm-ratio=3.0 attack='sign-flip' attack-scale=4.0 "
    f"attack-site={ATTACKER}",
}
ATTACK_BASE = f"num-sites=5 num-rounds=2 strategy='fedavg' dp=false {PLAIN_LR}"


def overrides_for(part_base: str, extra: str, folder: Path) -> str:
    """The full ``--run-config`` string of one run."""
    return f"{MEDQUAD} {SIZE} {part_base} {extra} output-dir='{folder}'".strip()


def run_one(name: str, overrides: str, folder: Path, dry_run: bool) -> dict[str, Any] | None:
    """Run ``python -m simulations.run`` unless ``folder`` already holds a finished run; return its figures."""
    command = [sys.executable, "-m", "simulations.run", "--quiet", "--run-config", overrides]
    print(f'[{time.strftime("%H:%M:%S")}] {name}: python -m simulations.run --run-config "{overrides}"', flush=True)
    if dry_run:
        return None
    started = time.time()
    if not (folder / "summary.json").exists():
        log = folder / "flower.log"
        if log.exists() and log.stat().st_mtime > time.time() - IN_PROGRESS_SECONDS:
            print("  skipped: another process is writing this run right now", flush=True)
            return None
        if folder.exists():  # an unfinished run: its sites' ledgers would carry over, so start clean
            shutil.rmtree(folder)
        done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  failed: {(done.stdout + done.stderr)[-1500:]}", flush=True)
            return {"name": name, "overrides": overrides, "error": (done.stdout + done.stderr)[-1500:]}
    figures = read_run(folder)
    figures.update({"name": name, "overrides": overrides, "bench_seconds": time.time() - started})
    print(
        f"  accuracy {figures['accuracy']:.3f}, rejected {figures['rejected']}, {figures['wall_seconds']:.0f} s",
        flush=True,
    )
    return figures


def read_run(folder: Path) -> dict[str, Any]:
    """The figures of one finished run: final and per-round accuracy, bytes, rejections, epsilon."""
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    rounds = sorted({r["round"] for r in rows})
    curve = [
        float(np.mean([r["accuracy"] for r in rows if r["round"] == k and r.get("accuracy") is not None]))
        for k in rounds
    ]
    later = [r["bytes_up"] for r in rows if r["round"] > 1 and r.get("train_status") == "trained"]
    norms = {}
    for row in rows:
        if row.get("update_norm") is not None:
            norms.setdefault(row["site"], []).append(row["update_norm"])
    privacy = summary.get("privacy") or {}
    aggregation = summary.get("aggregation") or {}
    residuals = [r["relative_residual"] for r in rows if r.get("relative_residual") is not None]
    final_losses = [r["eval_loss"] for r in rows if r["round"] == rounds[-1] and r.get("eval_loss") is not None]
    return {
        "accuracy": summary["accuracy"],
        "curve": curve,
        "eval_loss": float(np.mean(final_losses)) if final_losses else None,
        "lora_gain": curve[-1] - curve[PROBE_ROUNDS - 1] if len(curve) > PROBE_ROUNDS else None,
        "per_site": {site: v["accuracy"] for site, v in summary["per_site"].items()},
        "bytes_up_after_round_1": float(np.mean(later)) if later else None,
        "rejected": aggregation.get("rejected_total", 0),
        "rejected_by_site": aggregation.get("rejected_by_site", {}),
        "update_norms": {site: [round(v, 4) for v in values] for site, values in norms.items()},
        "epsilon": max((p["epsilon"] for p in privacy.values() if p.get("epsilon") is not None), default=None),
        "relative_residual_mean": float(np.mean(residuals)) if residuals else None,
        "wall_seconds": summary["wall_seconds"],
        "run_dir": str(folder),
    }


def medquad_byte_rows() -> list[dict]:
    """Part a: bytes per site per round for MiniLM's shapes with MedQuAD's 16-class head."""
    rng = np.random.default_rng(0)
    adapter = minilm_adapter(rng)
    for name in list(adapter):
        if "modules_to_save" in name:
            shape = (MEDQUAD_CLASSES, *adapter[name].shape[1:])
            adapter[name] = np.zeros(shape, dtype=np.float32)
    return byte_rows(adapter)


def print_report(report: dict[str, Any]) -> None:
    """Print the three tables."""
    if report.get("bytes"):
        measured = {
            r["name"].removesuffix("-dp"): r.get("bytes_up_after_round_1")
            for r in report.get("accuracy", [])
            if r and "error" not in r
        }
        print(
            f"\n(a) bytes per site per round, MiniLM rank 8 on query,value + {MEDQUAD_CLASSES}-class head "
            f"(full model {FULL_MODEL_BYTES:,} B)"
        )
        print(f"{'strategy':<22}{'codec':<7}{'up B':>11}{'down B':>12}{'of full':>9}{'measured up B':>15}")
        for row in report["bytes"]:
            seen = measured.get(row["strategy"]) if row["codec"] == "none" else None
            print(
                f"{row['strategy']:<22}{row['codec']:<7}{row['bytes_up']:>11,}{row['bytes_down']:>12,}"
                f"{row['fraction_of_full_model']:>9.3%}{(f'{seen:,.0f}' if seen else '-'):>15}"
            )
    for key, title in (
        ("accuracy", "(b) 3 MedQuAD sites: 5 probe rounds, then 3 LoRA rounds"),
        ("attack", f"(c) 5 MedQuAD sites, site {ATTACKER} attacking, fedavg, no DP"),
    ):
        rows = [r for r in report.get(key, []) if r]
        if not rows:
            continue
        clean = next((r["accuracy"] for r in rows if r["name"] == "clean" and "accuracy" in r), None)
        print(f"\n{title}")
        print(
            f"{'run':<30}{'accuracy':>9}{'loss':>8}{'LoRA gain':>10}{'vs clean':>9}{'rejected':>9}{'epsilon':>8}"
            f"{'resid':>7}{'wall s':>7}  accuracy per round"
        )
        for r in rows:
            if "error" in r:
                print(f"{r['name']:<30}  failed")
                continue
            delta = f"{r['accuracy'] - clean:+.3f}" if clean is not None and key == "attack" else ""
            eps = f"{r['epsilon']:.2f}" if r.get("epsilon") else "-"
            resid = f"{r['relative_residual_mean']:.2f}" if r.get("relative_residual_mean") is not None else "-"
            gain = f"{r['lora_gain']:+.3f}" if r.get("lora_gain") is not None else "-"
            print(
                f"{r['name']:<30}{r['accuracy']:>9.3f}{r['eval_loss']:>8.3f}{gain:>10}{delta:>9}{r['rejected']:>9}"
                f"{eps:>8}{resid:>7}"
                f"{r['wall_seconds']:>7.0f}  {' '.join(f'{a:.3f}' for a in r['curve'])}"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the parts asked for, print the tables, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--parts", nargs="+", default=["bytes", "accuracy", "attack"], choices=["bytes", "accuracy", "attack"]
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_strategies.json"))
    parser.add_argument(
        "--runs", type=Path, default=Path("runs/bench_strategies"), help="folder of the run directories"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    runs = args.runs.resolve()
    report: dict[str, Any] = {"settings": {"medquad": MEDQUAD, "size": SIZE, "attacker": ATTACKER}}
    started = time.time()
    if "accuracy" in args.parts:
        report["accuracy"] = [
            run_one(name, overrides_for("", extra, runs / name), runs / name, args.dry_run)
            for name, extra in ACCURACY_RUNS.items()
        ]
    if "attack" in args.parts:
        report["attack"] = [
            run_one(
                name, overrides_for(ATTACK_BASE, extra, runs / f"attack-{name}"), runs / f"attack-{name}", args.dry_run
            )
            for name, extra in ATTACK_RUNS.items()
        ]
    if "bytes" in args.parts:
        report["bytes"] = medquad_byte_rows()
    report["seconds_total"] = time.time() - started
    print_report(report)
    if not args.dry_run:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwritten to {args.out}")
    return report


if __name__ == "__main__":
    main()
