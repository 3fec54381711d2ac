"""How a simulation's time and memory grow with the number of sites: 10, 100, 1,000 sites of CLINC150.

Usage: ``python -m simulations.bench_scale [--sites 10 100 1000] [--modes private plain] [--out runs/bench_scale.json]``

Each row is one fresh run (``simulations/run.py::fresh_run``) of CLINC150
(``../shared/data/clinc150``, 23,700 utterances, iid over the sites, so
about 19 training and 5 test records a site at 1,000 sites) with a few steps
each: 2 private probe rounds and 1 LoRA round (3 rounds), max-length 32,
each virtual site's worker on one CPU (two workers on this machine),
``eval-fraction`` 0.1 (every site in the last round). ``private``: DP at
epsilon 8 per site; ``plain``: ``dp = false``. Measured per row:

- wall seconds of the run and of each round (the ServerApp's round lines);
- seconds per site-round: a round's seconds over its sites, for rounds 2 and
  3 (round 1 also loads the model and embeds every site's records);
- the server's own work per site-round (building messages, aggregating,
  the report rows and the checkpoint: the ``(server X s)`` of each round
  line), rounds 2 and 3, in milliseconds;
- peak memory of the run's own processes (launcher, ``flwr run``, SuperLink,
  simulation, Ray and its workers): the sum of their PSS, sampled every
  0.5 s (:class:`RunMemoryPeak`; other processes on the machine do not
  count); and, as before, the machine's used memory above what it used
  before the run (every process on the machine: why benchmarks run alone);
- bytes up and down (summary.json).

Prints a table and writes JSON. The default ``make run`` is untouched.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

DATA = "../shared/data/clinc150/data_full.json"
COMMON = {
    "dataset": DATA,
    "partition": "iid",
    "recipe": "probe-then-lora",
    "probe-rounds": 2,
    "probe-steps": 3,
    "probe-batch-size": 8,
    "num-rounds": 1,
    "local-steps": 2,
    "batch-size": 8,
    "max-length": 32,
    "eval-fraction": 0.1,
    "round-timeout": 3600.0,
}
MODES = {"private": {"dp": True, "target-epsilon": 8.0}, "plain": {"dp": False}}


class MemoryPeak:
    """The machine's peak used memory above its level at start, sampled in a thread (psutil).

    Subclasses change what one reading is (:meth:`reading`) and what it is
    measured from (:meth:`start_level`); the sampling thread is this one.
    """

    def __init__(self, every: float = 0.5) -> None:
        import psutil

        self.psutil = psutil
        self.every = every
        self.baseline = self.start_level()
        self.peak = self.baseline
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def reading(self) -> int:
        """One reading, in bytes: the machine's used memory."""
        return self.psutil.virtual_memory().used

    def start_level(self) -> int:
        """What the peak is measured from: the reading before the run."""
        return self.reading()

    def sample(self) -> None:
        """Keep the highest reading until stopped."""
        while self.running:
            self.peak = max(self.peak, self.reading())
            time.sleep(self.every)

    def __enter__(self) -> MemoryPeak:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.running = False
        self.thread.join()

    @property
    def peak_mb(self) -> float:
        """Peak reading above the start level, in MiB."""
        return (self.peak - self.baseline) / 2**20


class RunMemoryPeak(MemoryPeak):
    """The peak memory of one run's own processes: the sum of their PSS, from zero, sampled in a thread (psutil).

    A run's processes are this launcher and every process whose environment
    carries the run's virtual-site settings (``client.site_policy.SIMULATION_ENV``
    naming ``run_dir``): ``flwr run``, the SuperLink, the simulation process,
    Ray's daemons and its workers all inherit it from the launcher. Other
    sessions' processes on the machine do not count, unlike :class:`MemoryPeak`.
    PSS (proportional set size) counts a page shared by k processes (the
    torch libraries both workers map) as 1/k in each, so the sum is the
    memory the run holds, without counting shared pages twice.
    """

    def __init__(self, run_dir: Path, every: float = 0.5) -> None:
        import os

        from client.site_policy import SIMULATION_ENV

        self.own_pid = os.getpid()
        self.variable = SIMULATION_ENV
        self.marker = str(run_dir.resolve())
        super().__init__(every)

    def start_level(self) -> int:
        """Zero: the peak is the run's whole PSS total."""
        return 0

    def run_processes(self) -> list[Any]:
        """This process and every process whose environment names the run directory."""
        found = []
        for process in self.psutil.process_iter():
            try:
                if process.pid == self.own_pid or self.marker in process.environ().get(self.variable, ""):
                    found.append(process)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
        return found

    def reading(self) -> int:
        """The PSS total of the run's processes, in bytes (a process that ends while read is left out)."""
        total = 0
        for process in self.run_processes():
            try:
                total += process.memory_full_info().pss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
        return total


def round_seconds(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Each round's duration, and the server's own work in it, from the ServerApp's round lines in flower.log.

    Read with ``fedcl/pilot/run_log.py::round_timings``; the server's part
    (messages, aggregation, report, checkpoint: ``(server X s)``) is missing
    from lines that do not carry it.
    """
    from fedcl.pilot.run_log import round_timings

    lines = (run_dir / "flower.log").read_text(encoding="utf-8", errors="replace").splitlines()
    timings = round_timings((0.0, line) for line in lines)
    server = {t.round: t.server_seconds for t in timings if t.server_seconds is not None}
    return {timing.round: timing.seconds for timing in timings}, server


def run_row(sites: int, mode: str, out_root: Path) -> dict[str, Any]:
    """One run of ``sites`` sites in ``mode``; returns its measured row."""
    from simulations.run import fresh_run, largest_epsilon

    overrides = {**COMMON, **MODES[mode], "num-sites": sites}
    folder = out_root / f"{mode}-{sites}"
    with MemoryPeak() as memory, RunMemoryPeak(folder) as run_memory:
        run = fresh_run(overrides, folder, cpus_per_site=1)
    rounds, server = round_seconds(run.run_dir)
    later = [rounds[r] for r in sorted(rounds) if r > 1]
    server_later = [server[r] for r in sorted(server) if r > 1]
    summary = run.summary
    return {
        "sites": sites,
        "mode": mode,
        "accuracy": summary.get("accuracy"),
        "max_epsilon": largest_epsilon(summary),
        "wall_seconds": round(run.wall_seconds, 1),
        "round_seconds": {str(r): s for r, s in sorted(rounds.items())},
        "site_round_seconds": round(sum(later) / (len(later) * sites), 4) if later else None,
        "first_round_seconds": rounds.get(1),
        "server_round_seconds": {str(r): s for r, s in sorted(server.items())},
        "server_site_round_ms": round(1000 * sum(server_later) / (len(server_later) * sites), 3)
        if server_later
        else None,
        "peak_mb": round(memory.peak_mb, 1),
        "run_peak_pss_mb": round(run_memory.peak_mb, 1),
        "peak_mb_per_site": round(memory.peak_mb / sites, 3),
        "bytes_up": summary["bytes"]["up_total"],
        "bytes_down": summary["bytes"]["down_total"],
        "run_dir": str(run.run_dir),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| sites | mode | accuracy | max epsilon | wall s | round 1 s | rounds 2, 3 s | s per site-round (rounds 2-3) "
        "| server ms per site-round | run's peak PSS MB | machine peak MB | MB up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "-" if r["max_epsilon"] is None else f"{r['max_epsilon']:.2f}"
        later = ", ".join(f"{s:.1f}" for k, s in r["round_seconds"].items() if k != "1")
        server = "-" if r.get("server_site_round_ms") is None else f"{r['server_site_round_ms']:.2f}"
        lines.append(
            f"| {r['sites']} | {r['mode']} | {r['accuracy']:.3f} | {eps} | {r['wall_seconds']:.0f} | "
            f"{r['first_round_seconds']:.1f} | {later} | {r['site_round_seconds']:.4f} | {server} | "
            f"{r.get('run_peak_pss_mb', float('nan')):.0f} | {r['peak_mb']:.0f} | {r['bytes_up'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the rows one after the other (never two at once: they would share the 2 cores); print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", default="runs/bench_scale.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for sites in args.sites:
        for mode in args.modes:
            print(f"bench_scale: {sites} sites, {mode} ...", flush=True)
            try:
                rows.append(run_row(sites, mode, out.parent / "bench_scale"))
            except (RuntimeError, ValueError) as err:  # one failed row must not lose the others
                print(f"bench_scale: {sites} sites, {mode} failed: {err}", flush=True)
                rows.append({"sites": sites, "mode": mode, "error": str(err)})
            out.write_text(json.dumps({"common": COMMON, "rows": rows}, indent=1), encoding="utf-8")
    print(table([r for r in rows if "error" not in r]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
