"""A probe run in deployment against the same run in simulation, with and without the sites' feature cache.

    .venv/bin/python -m simulations.bench_deployment [--records 200] [--probe-rounds 3]
        [--variants deployment-off,deployment-on,deployment-warm,simulation-off,simulation-on]
        [--breakdown] [--out runs/bench_deployment.json]

The run: 2 sites of ``--records`` BBC News records each (80% train, 20% test,
an IID split written as each site's ``train.csv`` and ``test.csv`` by the
launcher's own partitioning source), ``recipe="probe-then-lora"``,
``--probe-rounds`` probe rounds and no LoRA round, DP at the defaults.

Variants:

- ``deployment-off`` / ``deployment-on``: one insecure SuperLink and two
  SuperNodes on loopback, each SuperNode started with its own files and a
  fresh state directory (``--node-config "site-name=... data-path=...
  test-path=... state-dir=... feature-cache=false|true"``), then ``flwr run``
  of this project. Flower 1.42 starts a new ClientApp process for every
  message, so every message imports torch and loads the model again; with the
  cache on, a site embeds its records at its first message and reads the
  features from its state directory at every later one.
- ``deployment-warm``: as ``deployment-on``, with each site's feature cache
  copied from the ``deployment-on`` run into its fresh state directory (a
  site's second run on the same records: a fresh ledger, warm features).
- ``simulation-off`` / ``simulation-on``: the launcher, ``python -m
  simulations.run``, with the same data sizes (one Ray worker process serves
  both virtual sites and keeps its module caches; ``FEDCL_FEATURE_CACHE``
  switches the disk cache, as virtual sites have no node config of their own).

For each: the seconds from submitting the run to the end of round 1 (by the
arrival of the server's "round 1 ... done" line), the server's own time for
each round ("done in X s": from the end of the previous round, so round 1
holds the first message's cold start), and the mean of rounds 2 onward. Every
site's reply is checked (trained and evaluated), so a refusal can never pass
for a fast round. ``--breakdown`` also times, in a fresh Python process per
variant, what one probe message does: the imports, the model load, reading
and tokenising the records, the embedding, the round and the evaluation.
Goal: a probe round in deployment within 10 s on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from client.feature_store import FEATURE_CACHE_ENV, FOLDER

PROJECT = Path(__file__).resolve().parent.parent
GOAL = 10.0  # seconds per probe round in deployment (issue 9)
ROUND_LINE = re.compile(r"round (\d+)/(\d+) \((\w+)\) done in ([\d.]+) s")
VARIANTS = ("deployment-off", "deployment-on", "deployment-warm", "simulation-off", "simulation-on")
RUN_TIMEOUT = 900.0  # seconds one run may take before it counts as failed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def toml_value(value: Any) -> str:
    """A run-config value as ``flwr run --run-config`` takes it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def overrides_text(values: dict[str, Any]) -> str:
    """``key=value`` pairs separated by spaces."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def run_settings(records: int, probe_rounds: int) -> dict[str, Any]:
    """The run config both modes share (the launcher's partitioning keys give each site ``records`` records)."""
    train = int(round(records * 0.8))
    return {
        "dataset": "bbc-news",
        "partition": "iid",
        "num-sites": 2,
        "max-train-examples": train,
        "max-test-examples": records - train,
        "recipe": "probe-then-lora",
        "probe-rounds": probe_rounds,
        "num-rounds": 0,
    }


def write_sites(settings: dict[str, Any], root: Path) -> tuple[list[Path], dict[str, Any]]:
    """Each site's ``train.csv`` and ``test.csv`` under ``root/site-<i>/``, and the public keys (labels)."""
    from fedcl.run_config import parse_run_config
    from simulations.run import pyproject_defaults
    from simulations.site_files import virtual_sites, write_site_files

    sites = virtual_sites(parse_run_config({**pyproject_defaults(), **settings}))
    return write_site_files(sites, root), dict(sites.public)


class Processes:
    """Processes started in their own sessions, each stopped (with its descendants) when the block ends.

    Each one's output goes to its log, every line prefixed with the seconds since the epoch when it arrived.
    """

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen, threading.Thread]] = []

    def start(self, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start ``command`` with its timed output in ``log``."""
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )

        def pump() -> None:
            with log.open("w", encoding="utf-8") as out:
                for line in proc.stdout or []:
                    out.write(f"{time.time():.3f} {line}")
                    out.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        self.started.append((proc, reader))
        return proc

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_exc: object) -> None:
        for proc, reader in reversed(self.started):
            stop_tree(proc.pid)
            reader.join(timeout=5)


def message_times(log: Path) -> dict[str, float]:
    """From a SuperNode's timed log: mean seconds of a ClientApp process (start to reply sent), by message type,
    and mean seconds between a reply sent and the next message received (Flower's polling and the server's work).
    """
    events = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        stamp, _, text = line.partition(" ")
        for kind, pattern in (("receive", "Receiving: "), ("start", "Start `flwr-clientapp`"), ("sent", "Sending: ")):
            if pattern in text:
                events.append(
                    (kind, float(stamp), text.split(pattern, 1)[1].split(" ", 1)[0] if kind != "start" else "")
                )
    process: dict[str, list[float]] = {}
    gaps: list[float] = []
    started, last_sent = None, None
    for kind, stamp, message in events:
        if kind == "receive" and last_sent is not None:
            gaps.append(stamp - last_sent)
        elif kind == "start":
            started = stamp
        elif kind == "sent" and started is not None:
            process.setdefault(message, []).append(stamp - started)
            started, last_sent = None, stamp
    means = {f"clientapp_{name}_s": sum(v) / len(v) for name, v in process.items()}
    return {**means, "between_messages_s": sum(gaps) / len(gaps) if gaps else 0.0}


def stop_tree(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM a process and its descendants (found before it goes), then SIGKILL whatever is left."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Poll ``predicate`` every 0.1 s; RuntimeError naming ``what`` after ``timeout``."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def timed_run(command: list[str], env: dict[str, str], log: Path, cwd: Path = PROJECT) -> dict[str, Any]:
    """Run a command that prints the server's round lines; their arrival times, the rounds' own times."""
    started = time.time()
    arrivals: dict[int, float] = {}
    seconds: dict[int, float] = {}
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        try:
            for line in proc.stdout or []:
                out.write(line)
                match = ROUND_LINE.search(line)
                if match:
                    number = int(match.group(1))
                    arrivals[number], seconds[number] = time.time() - started, float(match.group(4))
                if time.time() - started > RUN_TIMEOUT:
                    raise RuntimeError(f"{command[0]} ran past {RUN_TIMEOUT:.0f} s; see {log}")
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                stop_tree(proc.pid)
    if proc.returncode != 0 or not seconds:
        raise RuntimeError(f"{' '.join(command[:3])} failed (exit {proc.returncode}); see {log}")
    rounds = [seconds[n] for n in sorted(seconds)]
    return {
        "to_round_1_s": arrivals.get(1),
        "round_s": rounds,
        "round_1_s": rounds[0],
        "mean_later_round_s": sum(rounds[1:]) / len(rounds[1:]) if len(rounds) > 1 else None,
        "wall_s": time.time() - started,
    }


def check_replies(run_dir: Path, sites: int, rounds: int) -> None:
    """Every site trained and evaluated in every round (a refusal is fast and would fake a result)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    bad = [r for r in rows if r.get("train_status") != "trained" or r.get("eval_status") != "evaluated"]
    if bad or len(rows) != sites * rounds:
        raise RuntimeError(f"{run_dir}: {len(rows)} site rows for {sites} sites x {rounds} rounds, {len(bad)} not ok")


def check_caches(states: list[Path], cache: bool) -> None:
    """Each site kept a feature cache in its state directory exactly when the variant switched it on."""
    kept = [(state / FOLDER).is_dir() for state in states]
    if kept != [cache] * len(states):
        raise RuntimeError(f"feature caches kept {kept} with the cache {'on' if cache else 'off'}: the switch failed")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The launcher's Flower environment, without a simulation launcher's variable (these are real sites)."""
    from client.site_policy import SIMULATION_ENV
    from simulations.run import flower_environment

    env = flower_environment(flwr_home)
    env.pop(SIMULATION_ENV, None)
    env.pop(FEATURE_CACHE_ENV, None)
    return env


def deployment_run(
    name: str,
    settings: dict[str, Any],
    folders: list[Path],
    public: dict[str, Any],
    work: Path,
    cache: bool,
    warm_from: Path | None = None,
) -> dict[str, Any]:
    """One SuperLink and a SuperNode per site on loopback (insecure), then ``flwr run``; the timings."""
    root = work / name
    flwr_home = root / "flwr-home"
    env = flower_env(flwr_home)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
        encoding="utf-8",
    )
    run_dir = root / "server-run"
    with Processes() as processes:
        processes.start(
            [
                str(Path(sys.executable).parent / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
            env,
            root / "superlink.log",
        )
        wait_for(lambda: listening(port), "the SuperLink to listen")
        logs = []
        for index, folder in enumerate(folders):
            state = root / f"state-site-{index}"
            state.mkdir(parents=True)
            if warm_from is not None:
                shutil.copytree(warm_from / f"state-site-{index}" / FOLDER, state / FOLDER)
            node = (
                f"site-name='site-{index}' data-path='{folder / 'train.csv'}' test-path='{folder / 'test.csv'}' "
                f"state-dir='{state}' feature-cache={'true' if cache else 'false'}"
            )
            log = root / f"supernode-{index}.log"
            processes.start(
                [
                    str(Path(sys.executable).parent / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node,
                ],
                env,
                log,
            )
            logs.append(log)
        wait_for(
            lambda: all("SuperNode ID" in log.read_text(encoding="utf-8", errors="replace") for log in logs),
            "the SuperNodes to connect",
        )
        run_config = {**settings, **public, "output-dir": str(run_dir)}
        command = [
            str(Path(sys.executable).parent / "flwr"),
            "run",
            str(PROJECT),
            "bench",
            "--run-config",
            overrides_text(run_config),
            "--stream",
        ]
        timings = timed_run(command, env, root / "flwr-run.log")
        wait_for(lambda: (run_dir / "summary.json").exists(), "the run's summary", timeout=60)
    check_replies(run_dir, len(folders), settings["probe-rounds"])
    check_caches([root / f"state-site-{index}" for index in range(len(folders))], cache)
    per_site = [message_times(log) for log in logs]
    messages = {key: sum(site[key] for site in per_site) / len(per_site) for key in per_site[0]}
    return {"mode": "deployment", "cache": cache, "warm": warm_from is not None, **timings, "messages": messages}


def simulation_run(name: str, settings: dict[str, Any], work: Path, cache: bool) -> dict[str, Any]:
    """``python -m simulations.run`` with the same settings; the timings."""
    root = work / name
    root.mkdir(parents=True)
    run_dir = root / "run"
    env = {key: value for key, value in os.environ.items() if key != FEATURE_CACHE_ENV}
    env.update({FEATURE_CACHE_ENV: "1" if cache else "0", "PYTHONUNBUFFERED": "1"})
    command = [
        sys.executable,
        "-m",
        "simulations.run",
        "--run-config",
        overrides_text({**settings, "output-dir": str(run_dir)}),
    ]
    timings = timed_run(command, env, root / "launcher.log")
    check_replies(run_dir, settings["num-sites"], settings["probe-rounds"])
    check_caches([run_dir / "sites" / f"site-{index}" for index in range(settings["num-sites"])], cache)
    return {"mode": "simulation", "cache": cache, "warm": False, **timings}


BREAKDOWN_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
marks = {}
def mark(name):
    global t0
    now = time.perf_counter(); marks[name] = now - t0; t0 = now
import flwr.app, flwr.clientapp; mark("import flwr")
import torch; mark("import torch")
import transformers; mark("import transformers")
import peft; mark("import peft")
import client.app; mark("import client.app (the rest)")
loaded = sorted(m for m in ("opacus", "avalanche", "torchvision", "scipy", "sklearn") if m in sys.modules)
args = json.loads(sys.argv[1])
from client.feature_store import attach_feature_store
from client.phases import cached_head_inputs
from client.site_policy import site_policy
from client.site_round import site_round
from client.site_runtime import site_data
from client.site_state import open_state
from client.site_data import site_files
from client.evaluation import evaluate_adapter
from client.data_fingerprint import check_data_fingerprint
from fedcl.model_factory import configure_torch_threads, load_adapter_model, set_trainable_arrays
from fedcl.run_config import parse_run_config
from client.site_runtime import SiteRuntime
from client.device import site_device
configure_torch_threads()
config = parse_run_config(args["run_config"])
device = site_device(args["node_config"])
adapter = load_adapter_model(config, num_labels=len(config.label_names), device=device); mark("load the model")
data = site_data(config, site_files(args["node_config"], config, {}), adapter.tokenizer)
mark("read and tokenise the records")
runtime = SiteRuntime(config, data, adapter, device)
policy = site_policy(args["node_config"], {})
state = open_state(policy.state_dir)
check_data_fingerprint(state, runtime)
attach_feature_store(runtime, args["node_config"], state, {})
mark("check the records' fingerprint, attach the store")
set_trainable_arrays(adapter.model, adapter.initial_state)
cached_head_inputs(runtime, "train"); mark("embed the train split (or read its cache)")
from client.continual import stream_context
schedule = stream_context(runtime).schedule
result = site_round(runtime, policy, state, {"server-round": 1, **schedule.round_config(1)}, run_id=1)
assert result.status == "trained", result.reason
mark("the probe round")
evaluate_adapter(runtime, 1); mark("evaluate (embeds the test split, or reads its cache)")
print("BREAKDOWN " + json.dumps({"marks": marks, "heavy_modules_loaded": loaded}))
"""


def breakdown(
    name: str,
    settings: dict[str, Any],
    folder: Path,
    public: dict[str, Any],
    work: Path,
    cache: bool,
    warm_from: Path | None = None,
) -> dict[str, Any]:
    """Time one probe message's stages in a fresh Python process (what every deployment message pays)."""
    from simulations.run import pyproject_defaults

    state = work / name / "state"
    state.parent.mkdir(parents=True)
    if warm_from is not None:
        shutil.copytree(warm_from / FOLDER, state / FOLDER)
    args = {
        "run_config": {**pyproject_defaults(), **settings, **public},
        "node_config": {
            "site-name": "site-0",
            "data-path": str(folder / "train.csv"),
            "test-path": str(folder / "test.csv"),
            "state-dir": str(state),
            "feature-cache": cache,
        },
    }
    env = flower_env(work / name / "flwr-home")
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", BREAKDOWN_CHILD, json.dumps(args)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wall = time.perf_counter() - started
    line = next((line for line in out.stdout.splitlines() if line.startswith("BREAKDOWN ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"the breakdown process failed:\n{out.stderr[-3000:]}")
    return {
        "cache": cache,
        "warm": warm_from is not None,
        "wall_s": wall,
        "state": str(state),
        **json.loads(line.removeprefix("BREAKDOWN ")),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a text table (deployment rows also show a site's mean ClientApp seconds per message)."""
    lines = [
        f"{'variant':<16} {'to end of round 1':>17} {'round 1':>8} {'mean later round':>16} {'train msg':>9} "
        f"{'eval msg':>8} {'between':>7}  rounds (s)",
    ]
    for name, r in results.items():
        later = f"{r['mean_later_round_s']:.1f}" if r["mean_later_round_s"] is not None else "-"
        messages = r.get("messages", {})
        cells = [f"{messages[k]:.1f}" if k in messages else "-" for k in ("clientapp_train_s", "clientapp_evaluate_s")]
        between = f"{messages['between_messages_s']:.1f}" if "between_messages_s" in messages else "-"
        lines.append(
            f"{name:<16} {r['to_round_1_s']:>17.1f} {r['round_1_s']:>8.1f} {later:>16} {cells[0]:>9} {cells[1]:>8} "
            f"{between:>7}  " + ", ".join(f"{s:.1f}" for s in r["round_s"])
        )
    return "\n".join(lines)


def breakdown_table(parts: dict[str, dict[str, Any]]) -> str:
    """The per-message stages as a text table, one column per variant."""
    names = list(parts)
    stages = list(next(iter(parts.values()))["marks"])
    width = max(len(stage) for stage in [*stages, "process wall (with interpreter start)"]) + 2
    lines = [f"{'stage of one probe message (s)':<{width}}" + "".join(f"{n:>16}" for n in names)]
    for stage in stages:
        lines.append(f"{stage:<{width}}" + "".join(f"{parts[n]['marks'].get(stage, 0.0):>16.2f}" for n in names))
    wall = "process wall (with interpreter start)"
    lines.append(f"{wall:<{width}}" + "".join(f"{parts[n]['wall_s']:>16.2f}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200, help="records per site (80%% train, 20%% test)")
    parser.add_argument("--probe-rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--breakdown", action="store_true", help="also time one message's stages")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, state directories)")
    parser.add_argument("--out", default="runs/bench_deployment.json")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; use some of {', '.join(VARIANTS)}")
    if "deployment-warm" in variants and "deployment-on" not in variants:
        parser.error("deployment-warm copies the caches of deployment-on: list deployment-on too")
    settings = run_settings(args.records, args.probe_rounds)
    work = Path(tempfile.mkdtemp(prefix="fedcl-bench-deployment-"))
    results: dict[str, dict[str, Any]] = {}
    parts: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    try:
        folders, public = write_sites(settings, work / "site-data")
        if args.breakdown:
            parts["cache off"] = breakdown("breakdown-off", settings, folders[0], public, work, cache=False)
            parts["cache on, cold"] = breakdown("breakdown-cold", settings, folders[0], public, work, cache=True)
            parts["cache on, warm"] = breakdown(
                "breakdown-warm",
                settings,
                folders[0],
                public,
                work,
                cache=True,
                warm_from=Path(parts["cache on, cold"]["state"]),
            )
            print(breakdown_table(parts), flush=True)
        for name in variants:
            print(f"bench_deployment: {name} ...", flush=True)
            load_before = os.getloadavg()[0]
            try:
                if name.startswith("deployment"):
                    warm = work / "deployment-on" if name == "deployment-warm" else None
                    results[name] = deployment_run(
                        name, settings, folders, public, work, cache=name != "deployment-off", warm_from=warm
                    )
                else:
                    results[name] = simulation_run(name, settings, work, cache=name == "simulation-on")
            except RuntimeError as err:  # one failed variant (see its log with --keep) leaves the others' results
                print(f"bench_deployment: {name} failed: {err}", flush=True)
                failed[name] = str(err)
                continue
            results[name]["load_average_1min"] = [load_before, os.getloadavg()[0]]
            print(table({name: results[name]}).splitlines()[-1], flush=True)
    finally:
        if args.keep:
            print(f"bench_deployment: working folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    report = {
        "settings": settings,
        "records_per_site": args.records,
        "goal_round_s": GOAL,
        "results": results,
        "failed": failed,
        "breakdown": parts,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"bench_deployment: wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
