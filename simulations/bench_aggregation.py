"""Aggregation benchmark: bytes on the wire per strategy and codec, and server aggregation time.

Synthetic arrays of the real shapes: all-MiniLM-L6-v2 (6 layers, hidden 384)
with rank-8 LoRA on query and value and a 5-class head (5 x 384 + 5), as peft
names them. Prints two tables and writes them as JSON.

    .venv/bin/python -m simulations.bench_aggregation [--out runs/bench_aggregation.json]

Bytes are those of the serialised Flower message (``ArrayRecord.count_bytes()``:
npy data and headers plus names) per site per round, compared with the base
model's 22,715,141 parameters in float32 (90,860,564 B). Times are the
server's ``aggregate`` call alone (best of ``--repeats``), with BLAS limited to
``--blas-threads`` threads (when threadpoolctl is installed) so that other
work on a small machine does not turn the SVDs into thread contention.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from strategies.aggregation import Aggregator, Arrays, SiteUpdate
from strategies.compression import CODECS, encode_arrays, serialized_bytes
from strategies.exact import residual_name
from strategies.ffa import ffa_trainable_names
from strategies.registry import build_aggregator

FULL_MODEL_BYTES = 90_860_564  # all-MiniLM-L6-v2: 22,715,141 parameters x 4 B (float32)
HIDDEN, LAYERS, RANK, CLASSES = 384, 6, 8, 5
MODULES = ("query", "value")


def minilm_adapter(rng: np.random.Generator, rank: int = RANK) -> Arrays:
    """A MiniLM-shaped LoRA adapter: A as peft initialises it (Kaiming uniform), small trained B, a head."""
    bound = 1 / np.sqrt(HIDDEN)
    arrays: Arrays = {}
    for layer in range(LAYERS):
        for module in MODULES:
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            arrays[f"{prefix}.lora_A.default.weight"] = rng.uniform(-bound, bound, (rank, HIDDEN)).astype(np.float32)
            arrays[f"{prefix}.lora_B.default.weight"] = (1e-2 * rng.standard_normal((HIDDEN, rank))).astype(np.float32)
    head = "base_model.model.classifier.modules_to_save.default"
    arrays[f"{head}.weight"] = (bound * rng.standard_normal((CLASSES, HIDDEN))).astype(np.float32)
    arrays[f"{head}.bias"] = np.zeros(CLASSES, dtype=np.float32)
    return arrays


def wire_names(strategy: str, names: list[str]) -> list[str]:
    """The tensors that travel each way every round under ``strategy`` (FFA: not A)."""
    return ffa_trainable_names(names) if strategy == "ffa" else sorted(names)


def byte_rows(adapter: Arrays) -> list[dict]:
    """Bytes per site per round, up and down, for each strategy and codec."""
    rows = []
    for strategy in ("fedavg", "ffa", "exact"):
        arrays = {n: adapter[n] for n in wire_names(strategy, list(adapter))}
        for codec in CODECS:
            size = serialized_bytes(encode_arrays(arrays, codec))
            rows.append(
                {
                    "strategy": strategy,
                    "codec": codec,
                    "tensors": len(arrays),
                    "bytes_up": size,
                    "bytes_down": size,
                    "fraction_of_full_model": size / FULL_MODEL_BYTES,
                }
            )
    residual = {residual_name(n): np.zeros((HIDDEN, HIDDEN), np.float32) for n in adapter if "lora_A" in n}
    full = {**adapter, **residual}
    rows.append(
        {
            "strategy": "exact+residual-sent",
            "codec": "none",
            "tensors": len(full),
            "bytes_up": serialized_bytes(adapter),
            "bytes_down": serialized_bytes(full),
            "fraction_of_full_model": serialized_bytes(full) / FULL_MODEL_BYTES,
        }
    )
    return rows


def synthetic_round(rng: np.random.Generator, current: Arrays, sites: int) -> list[SiteUpdate]:
    """``sites`` replies: every site's adapter is ``current`` plus its own small local change."""
    return [
        SiteUpdate(
            f"site-{i}",
            {n: v + (1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in current.items()},
            int(rng.integers(100, 1000)),
        )
        for i in range(sites)
    ]


def best_time(run: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` wall-clock timings of ``run()``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def timing_rows(current: Arrays, replies: list[SiteUpdate], sizes: list[int], repeats: int) -> list[dict]:
    """Server aggregation time for each strategy and number of replies."""
    trainable = ffa_trainable_names(current)
    ffa_replies = [SiteUpdate(u.site, {n: u.arrays[n] for n in trainable}, u.num_examples) for u in replies]
    cases: dict[str, tuple[Callable[[], Aggregator], list[SiteUpdate]]] = {
        "fedavg": (lambda: build_aggregator("fedavg"), replies),
        "ffa": (lambda: build_aggregator("ffa"), ffa_replies),
        "exact": (lambda: build_aggregator("exact"), replies),
        "robust+median": (lambda: build_aggregator("fedavg", robust="median"), replies),
    }
    rows = []
    for size in sizes:
        for label, (make, pool) in cases.items():
            seconds = best_time(lambda make=make, pool=pool, size=size: make().aggregate(current, pool[:size]), repeats)
            rows.append({"strategy": label, "replies": size, "seconds": seconds})
    return rows


@contextlib.contextmanager
def blas_threads(limit: int) -> Iterator[str]:
    """Limit BLAS threads inside the block when threadpoolctl is available; yields what was done."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "not limited (threadpoolctl is not installed)"
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield f"{limit}"


def print_tables(report: dict) -> None:
    """Print the byte and timing tables."""
    print(f"bytes per site per round (full model, float32: {FULL_MODEL_BYTES:,} B)")
    print(f"{'strategy':<22}{'codec':<7}{'tensors':>8}{'up B':>11}{'down B':>12}{'of full model':>15}")
    for row in report["bytes"]:
        print(
            f"{row['strategy']:<22}{row['codec']:<7}{row['tensors']:>8}{row['bytes_up']:>11,}"
            f"{row['bytes_down']:>12,}{row['fraction_of_full_model']:>14.3%}"
        )
    sizes = sorted({row["replies"] for row in report["timing"]})
    print(f"\nserver aggregation time, seconds (BLAS threads: {report['settings']['blas_threads']})")
    print(f"{'strategy':<16}" + "".join(f"{s:>10,}" for s in sizes))
    for label in dict.fromkeys(row["strategy"] for row in report["timing"]):
        seconds = {row["replies"]: row["seconds"] for row in report["timing"] if row["strategy"] == label}
        print(f"{label:<16}" + "".join(f"{seconds[s]:>10.3f}" for s in sizes))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables, write the JSON report; returns the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_aggregation.json"), help="JSON report path")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="numbers of replies")
    parser.add_argument("--repeats", type=int, default=3, help="timings per case; the best is kept")
    parser.add_argument("--blas-threads", type=int, default=1, help="BLAS threads during the timings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.sizes) < 1 or args.repeats < 1 or args.blas_threads < 1:
        parser.error("--sizes, --repeats and --blas-threads must be positive")
    rng = np.random.default_rng(args.seed)
    current = minilm_adapter(rng)
    started = time.perf_counter()
    replies = synthetic_round(rng, current, max(args.sizes))
    with blas_threads(args.blas_threads) as threads:
        timing = timing_rows(current, replies, sorted(args.sizes), args.repeats)
    report = {
        "settings": {
            "hidden": HIDDEN,
            "layers": LAYERS,
            "rank": RANK,
            "classes": CLASSES,
            "modules": list(MODULES),
            "repeats": args.repeats,
            "blas_threads": threads,
            "seed": args.seed,
            "full_model_bytes": FULL_MODEL_BYTES,
        },
        "bytes": byte_rows(current),
        "timing": timing,
        "seconds_total": time.perf_counter() - started,
    }
    print_tables(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return report


if __name__ == "__main__":
    main()
