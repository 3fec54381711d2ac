"""Run a simulation end to end: check the config, `flwr run .`, stop the SuperLink, show the report.

Usage (from the project root, what `make run` does)::

    python -m simulations.run                      # the default scenario
    python -m simulations.run --run-config "num-rounds=5 dataset='../shared/data/medquad/medquad.csv'"

Every user error (an unknown key, a bad value, a missing file or column, too
few examples, a model path that does not exist) stops the run before any
training with one line naming the key, the value and the fix.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcl.model_factory import resolve_model_path
from fedcl.recipe_choice import choose_recipe
from fedcl.run_config import ConfigError, RunConfig, parse_run_config

if TYPE_CHECKING:
    from simulations.site_files import VirtualSites

PROJECT = Path(__file__).resolve().parent.parent


def pyproject_defaults(project: Path = PROJECT) -> dict[str, Any]:
    """The run-config defaults declared in pyproject.toml."""
    with (project / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse Flower-style overrides ``"key=value key2='text'"`` (TOML values)."""
    from flwr.common.config import parse_config_args  # Flower's own parser, same rules as `flwr run`

    try:
        return dict(parse_config_args([text])) if text.strip() else {}
    except Exception as err:  # Flower raises plain exceptions with a usable message
        raise ConfigError(
            f"--run-config {text!r}: {err}; write key=value pairs separated by spaces, quote strings"
        ) from err


def prepare_config(overrides: dict[str, Any], cwd: Path) -> RunConfig:
    """Merge overrides into the defaults, make paths absolute, check everything, and hand the sites their files.

    The returned config declares the federation's public facts taken from the
    dataset (``labels``, ``groups``, the stream plan in label names); every
    virtual site's files are written under ``<run-dir>/site-data/``
    (``simulations/site_files.py``). ``resume=<run-dir>`` continues that run
    in that same directory.
    """
    flat = {**pyproject_defaults(), **overrides}
    config = parse_run_config(flat)
    if config.resume:
        resumed = (cwd / Path(config.resume).expanduser()).resolve()
        if not (resumed / "checkpoint").is_dir():
            raise ConfigError(
                f"config key 'resume' = {config.resume!r}: no checkpoint/ folder there; give the run directory of "
                "an earlier run (it holds summary.json or metrics.jsonl and checkpoint/)"
            )
        flat["resume"] = str(resumed)
        flat["output-dir"] = str(resumed)
    output_dir = (
        Path(flat["output-dir"]) if flat.get("output-dir") else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    flat["output-dir"] = str((cwd / output_dir).resolve())
    dataset = Path(config.dataset).expanduser()
    if config.dataset != "bbc-news" and not config.dataset.startswith("hf:") and not dataset.is_absolute():
        flat["dataset"] = str((cwd / dataset).resolve())
    model = Path(config.model).expanduser()
    if not config.model.startswith("package:") and (cwd / model).exists():
        flat["model"] = str((cwd / model).resolve())
    config = parse_run_config(flat)
    sites = preflight(config)
    config = parse_run_config({**flat, **sites.public})
    from simulations.site_files import write_site_files

    write_site_files(sites, site_data_root(config))
    return config


def site_data_root(config: RunConfig) -> Path:
    """Where the launcher writes every virtual site's files: ``<run-dir>/site-data/``."""
    return Path(config.output_dir) / "site-data"


def preflight(config: RunConfig) -> VirtualSites:
    """Load the data and split it, resolve the model: every user error surfaces here, before training."""
    from simulations.site_files import virtual_sites

    resolve_model_path(config.model)
    sites = virtual_sites(config)
    from simulations.continual_setup import check_stream  # the stream plan, replay size, empty experiences

    for note in check_stream(config, sites.data, sites.sites):
        print(f"fedcl: note: {note}", file=sys.stderr)
    if config.dp:
        check_budget_covers_one_round(config, min(len(site.train) for site in sites.sites))
    return sites


def check_budget_covers_one_round(config: RunConfig, smallest_site: int) -> None:
    """Refuse a budget that cannot pay for even the first round at the smallest site, naming what would."""
    from client.privacy_ledger import BudgetError, PrivacyLedger, require_budget_for_one_round

    first_probe = config.probe_phase_rounds > 0
    batch, steps = (
        (config.probe_batch_size, config.probe_steps) if first_probe else (config.batch_size, config.local_steps)
    )
    sample_rate = min(1.0, batch / smallest_site)
    if config.noise_multiplier == 0:
        try:
            require_budget_for_one_round(config.target_epsilon, config.delta, sample_rate, steps, config.accountant)
        except BudgetError as err:
            message = str(err).replace("local-steps", "probe-steps") if first_probe else str(err)
            raise ConfigError(f"config key 'target-epsilon' = {config.target_epsilon!r}: {message}") from err
        return
    cost = PrivacyLedger(config.target_epsilon, config.delta, [(config.noise_multiplier, sample_rate, steps)]).epsilon()
    if cost > config.target_epsilon:
        raise ConfigError(
            f"config key 'target-epsilon' = {config.target_epsilon!r}: one round ({steps} steps at sample rate "
            f"{sample_rate:.3g}, noise-multiplier {config.noise_multiplier}) costs epsilon {cost:.3f}; the smallest "
            f"workable setting is target-epsilon >= {cost:.3f}, or raise noise-multiplier, or take fewer steps"
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """Environment for `flwr run` on these machines (STACK-NOTES): the pilot's Flower environment, plus Ray's.

    The pilot's (``fedcl/pilot/environment.py``): this interpreter's scripts
    first on PATH (`flwr run` starts `flower-superlink`, which starts
    `flwr-simulation`, by name), no runtime installs, no telemetry, offline.
    Added here: Ray's temporary folder and a SuperLink of its own on free ports.
    """
    from fedcl.pilot.environment import flower_environment as pilot_environment

    env = pilot_environment(flwr_home)
    env.update(
        {
            "RAY_TMPDIR": str(flwr_home / "ray"),
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            # A SuperLink of its own on free ports: `flwr run` reuses whatever answers on its default local port,
            # so two runs at once (or a leftover SuperLink) would share one, and the first to finish would stop it.
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_local_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_local_port()),
        }
    )
    (flwr_home / "ray").mkdir(parents=True, exist_ok=True)
    return env


def ray_cluster_environment(address: str, sites_environment: Mapping[str, str]) -> dict[str, str]:
    """Environment that attaches the simulation to a running Ray cluster at ``address`` (``ray start --head``).

    ``RAY_ADDRESS`` makes the simulation's ``ray.init()`` join the cluster
    instead of starting its own Ray. The cluster's worker processes were
    started by ``ray start``, not by this launcher, so they do not inherit
    its environment: the virtual sites' settings go into the job's runtime
    environment instead (Ray merges ``RAY_JOB_CONFIG_JSON_ENV_VAR``'s
    ``runtime_env`` into the one Flower's backend passes to ``ray.init``), and
    every worker of the run, on any node, gets them. Raises ValueError for an
    address that is not ``host:port``.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"--ray-address {address!r}: give the head node's host:port as `ray start --head` printed it, "
            "e.g. 10.0.0.5:6379"
        )
    job = {"runtime_env": {"env_vars": dict(sites_environment)}}
    return {"RAY_ADDRESS": address, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}


def simulated_sites_environment(config: RunConfig, run_dir: Path) -> dict[str, str]:
    """What the launcher, as the operator of every virtual site, gives them: a state root, their files, their policy.

    A real site reads both from its SuperNode's node config
    (``client/site_policy.py``); virtual sites of a simulation have no node
    config of their own, so the launcher passes the same settings through
    the environment of the processes it starts. Each virtual site keeps its
    state in ``<run-dir>/sites/site-<partition-id>/``, reads its records from
    ``<run-dir>/site-data/site-<partition-id>/`` and takes the budget the
    launcher was asked for. The server never sends a path or a policy.
    """
    from client.site_policy import SIMULATION_ENV
    from simulations.site_files import COLUMNS

    policy = {
        "dp": config.dp,
        "target-epsilon": config.target_epsilon,
        "delta": config.delta,
        "accountant": config.accountant,
    }
    settings = {
        "state-root": str(run_dir.resolve() / "sites"),
        "data-root": str(run_dir.resolve() / "site-data"),
        "columns": COLUMNS,
        "policy": policy,
    }
    return {SIMULATION_ENV: json.dumps(settings)}


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _log_tail(log_path: Path, lines: int = 25) -> str:
    """The last lines of a log, for an error message that explains itself."""
    try:
        return "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log was written)"


# The ServerApp's lines the launcher has already said, or says better itself at the end; and one line per site
# (with 1,000 sites, 1,000 lines) that matters in a deployment, not in a simulation. All stay in flower.log.
REPEATED_SERVER_LINES = ("run directory ", "recipe ", "final mean accuracy ", "report ")
NOISY_SERVER_LINE = re.compile(r"^site '.*' bound to node \d+$")
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def terminal_line(line: str) -> str | None:
    """What the terminal shows of one line of Flower's output, or None to show nothing (it stays in flower.log).

    Shown: every ``fedcl:`` line (the ServerApp's progress line per round,
    the sites' own notes, warnings and errors), less the prefix, except the
    repeated and per-site ones above; any other ERROR or Traceback line whole.
    """
    text = ANSI_COLOUR.sub("", line.rstrip())
    if "fedcl: " in text:
        said = text.split("fedcl: ", 1)[1]
        if said.startswith(REPEATED_SERVER_LINES) or NOISY_SERVER_LINE.match(said):
            return None
        return said
    if "ERROR" in text or "Traceback" in text:
        return text
    return None


def stop_local_superlink(flwr_home: Path) -> None:
    """Stop the detached SuperLink that `flwr run` started under this FLWR_HOME."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            for child in proc.children(recursive=True):
                child.kill()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except psutil.TimeoutExpired:
                proc.kill()


def run_simulation(
    config: RunConfig,
    quiet: bool = False,
    project: Path = PROJECT,
    gpus_per_site: float | None = None,
    cpus_per_site: int | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run the simulation with `flwr run` and return the run directory (it holds summary.json).

    ``gpus_per_site``: the GPU share Ray gives each virtual site (None: all
    sites fit on the visible GPUs, 0 without CUDA; ``simulations/ray_resources.py``).
    ``cpus_per_site``: the CPUs Ray gives each virtual site's worker (None:
    Flower's default, 2; 1 on a 2-core machine runs two workers side by side).
    ``ray_address``: run the virtual sites on the Ray cluster whose head is
    there (:func:`ray_cluster_environment`); None: a Ray of the run's own.
    """
    from simulations.ray_resources import client_resources_options, default_gpus_per_site

    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = Path(tempfile.mkdtemp(prefix="fedcl-flwr-"))
    overrides = " ".join(f"{key}={_toml_value(value)}" for key, value in config.to_flat().items())
    command = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(project),
        "--federation-config",
        " ".join(
            [
                f"num-supernodes={config.num_sites}",
                *client_resources_options(
                    default_gpus_per_site(config.num_sites) if gpus_per_site is None else gpus_per_site,
                    cpus_per_site,
                ),
            ]
        ),
        "--run-config",
        overrides,
        "--stream",
    ]
    log_path = run_dir / "flower.log"
    try:
        with log_path.open("a", encoding="utf-8") as log:  # a resumed run keeps the first session's log
            sites = simulated_sites_environment(config, run_dir)
            env = {**flower_environment(flwr_home), **sites}
            if ray_address:
                env.update(ray_cluster_environment(ray_address, sites))
            proc = subprocess.Popen(
                command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
            said: set[str] = set()  # each site's notes come once per worker process that serves it: say them once
            for line in proc.stdout or []:
                log.write(line)
                shown = terminal_line(line)
                if quiet or shown is None or ("fedcl: " in line and shown in said):
                    continue  # errors and tracebacks are always shown, however often they repeat
                print(shown, flush=True)
                said.add(shown)
            proc.wait()
    finally:
        stop_local_superlink(flwr_home)
        shutil.rmtree(flwr_home, ignore_errors=True)
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        raise RuntimeError(f"the simulation did not finish; see {log_path}; its last lines:\n{_log_tail(log_path)}")
    return run_dir


@dataclass(frozen=True)
class FinishedRun:
    """A simulation a benchmark ran: its run directory, its summary.json and its wall time."""

    run_dir: Path
    summary: dict[str, Any]
    wall_seconds: float


def fresh_run(overrides: Mapping[str, Any], folder: Path, cpus_per_site: int | None = None) -> FinishedRun:
    """Run ``overrides`` in ``folder`` from scratch and read its summary (how every benchmark runs a row).

    The folder is emptied first: a kept site ledger would carry its spent
    budget into the new run. The wall time starts after the preflight.
    """
    shutil.rmtree(folder, ignore_errors=True)
    config = prepare_config({**overrides, "output-dir": str(folder)}, Path.cwd())
    started = time.time()
    run_dir = run_simulation(config, quiet=True, cpus_per_site=cpus_per_site)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return FinishedRun(run_dir, summary, time.time() - started)


def largest_epsilon(summary: Mapping[str, Any]) -> float | None:
    """The largest epsilon any site reported in a run's summary (None without DP)."""
    return max((p["epsilon"] for p in (summary.get("privacy") or {}).values()), default=None)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=5 lora-rank=4"')
    parser.add_argument("--quiet", action="store_true", help="print only the final report line")
    parser.add_argument(
        "--gpus-per-site",
        type=float,
        default=None,
        help="GPU share Ray gives each virtual site (default: all sites fit on the visible GPUs; 0 without CUDA)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="run the virtual sites on this Ray cluster (`ray start --head` prints it); default: a Ray of its own",
    )
    parser.add_argument(
        "--cpus-per-site",
        type=int,
        default=None,
        help="CPUs Ray gives each virtual site's worker (default: Flower's 2); workers = cluster CPUs / this",
    )
    args = parser.parse_args(argv)
    started = time.time()
    try:
        with warnings.catch_warnings():  # RDP's "largest alpha" notice during the budget check: a looser bound only
            warnings.simplefilter("ignore", UserWarning)
            config = prepare_config(parse_overrides(args.run_config), Path.cwd())
    except ConfigError as err:
        print(f"fedcl: error: {err}", file=sys.stderr)
        return 2
    privacy = f"DP at epsilon {config.target_epsilon}" if config.dp else "no DP"
    choice = choose_recipe(config)
    rounds = (
        "one class-sum release per experience"
        if choice.recipe == "ncm"
        else f"{config.total_rounds} rounds ({config.probe_phase_rounds} probe, {config.num_rounds} LoRA)"
    )
    print(
        f"fedcl: {config.num_sites} sites, recipe {choice.recipe} ({choice.reason}), {rounds}, {privacy}, "
        f"dataset {config.dataset}, run directory {config.output_dir}",
        flush=True,
    )
    try:
        run_dir = run_simulation(
            config,
            quiet=args.quiet,
            gpus_per_site=args.gpus_per_site,
            cpus_per_site=args.cpus_per_site,
            ray_address=args.ray_address,
        )
    except (RuntimeError, ValueError) as err:
        print(f"fedcl: error: {err}", file=sys.stderr)
        return 1
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    if summary.get("status", "completed") != "completed":
        reason = summary.get("failure_reason") or "see the log"
        print(f"fedcl: error: the run failed: {reason}; report {run_dir / 'summary.json'}", file=sys.stderr)
        return 1
    page = run_dir / "report" / "index.html"
    accuracy = "none (nothing was evaluated)" if summary.get("accuracy") is None else f"{summary['accuracy']:.3f}"
    print(
        f"fedcl: done in {time.time() - started:.0f} s: final mean accuracy {accuracy}; "
        + (
            f"report {page} (figures and the privacy statement; summary.json and metrics.jsonl beside it)"
            if page.exists()
            else f"report {run_dir / 'summary.json'} (no report page: `fedcl report {run_dir}` writes it)"
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
