"""`fedcl poc`: the whole pilot on one machine, as real processes, to see every step work before the hospitals do it.

What it does, in ``--workdir``::

    coordinator/certs/         ca.pem, ca.key, superlink.pem, superlink.key   (fedcl pki init)
    coordinator/flwr-home/     the coordinator's Flower folder: connection, app bundles (site register, run submit)
    coordinator/superlink.log  the SuperLink's output, each line timed
    coordinator/runs/<name>/   the run's report (summary.json, metrics.jsonl, adapter/)   (output-dir)
    coordinator/run-<id>.log   the run's ServerApp log
    site-<i>/keys/             site-<i>.key (0600), site-<i>.pub                (fedcl site keys)
    site-<i>/train.csv         the site's own copy of its data
    site-<i>/state/            the site's privacy ledger and state (node config state-dir)
    site-<i>/flwr-home/        the SuperNode's Flower folder (the app bundles it receives)
    site-<i>/supernode.log     the SuperNode's output, each line timed

then starts the SuperLink (TLS and SuperNode authentication unless
``--insecure``), registers each site's public key, starts one SuperNode per
site, submits the run, waits for it to end, prints where the results are and
stops every process it started, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from fedcl.pilot.connection import Connection, SuperLinkAddress
from fedcl.pilot.errors import PilotError
from fedcl.pilot.node_config import SiteNodeConfig, check_node_config, format_config, parse_node_config
from fedcl.pilot.pki import PkiFiles, SiteKeyFiles, init_pki, make_site_keys, parse_hosts
from fedcl.pilot.processes import ManagedProcess, ProcessGroup, StopOnSignals, free_port
from fedcl.pilot.registration import register_site
from fedcl.pilot.run_log import RoundTiming, message_spans, round_ends, round_timings
from fedcl.pilot.runs import ProgressLines, RunOutcome, check_run_config, submit_run, wait_for_run
from fedcl.pilot.site import start_site
from fedcl.pilot.site_data import label_values, place_site_data
from fedcl.pilot.superlink import start_superlink
from fedcl.run_config import RunConfig

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class PocPlan:
    """What ``fedcl poc`` was asked for."""

    sites: int
    data: list[Path]
    workdir: Path
    run_config: str = ""
    site_config: str = ""  # node-config keys every site gets (e.g. "dp=false"), after its own name and files
    text_column: str = ""
    label_column: str = ""
    max_records: int = 0  # per site, 0 = every record of its file (or share)
    insecure: bool = False
    force: bool = False
    timeout: float = 3600.0
    stream: bool = False

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise PilotError(f"--sites {self.sites}: give the number of sites, at least 1")
        if not self.data:
            raise PilotError("give the sites' data: --data FILE (split among the sites) or one --data per site")


@dataclass
class PocResult:
    """How the proof of concept went: the run's outcome, where everything is, and the timings measured."""

    outcome: RunOutcome
    run_dir: Path
    workdir: Path
    site_names: list[str]
    state_dirs: dict[str, Path]
    rounds: list[RoundTiming] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def site_name(index: int) -> str:
    """The proof of concept's name for site ``index`` (0-based): ``site-1``, ``site-2``, ..."""
    return f"site-{index + 1}"


def poc_run_config(plan: PocPlan, data_files: list[Path], label_column: str) -> str:
    """The run config the proof of concept submits: the one given, plus what it can fill in itself.

    ``num-sites`` (the number of sites), ``output-dir``
    (``coordinator/runs/<timestamp>`` in the workdir) and, when not given,
    ``labels`` (the label values found in the data: acceptable here because the
    operator holds every site's data; a deployment declares them).
    """
    values: dict[str, Any] = parse_node_config(plan.run_config)
    values.setdefault("num-sites", plan.sites)
    values.setdefault(
        "output-dir", str(plan.workdir.resolve() / "coordinator" / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    )
    if not str(values.get("labels", "")).strip():
        labels = sorted({value for path in data_files for value in label_values(path, label_column)})
        if any("," in value for value in labels):
            raise PilotError("a label value holds a comma; declare the labels yourself: --run-config \"labels='...'\"")
        values["labels"] = ",".join(labels)
    return format_config(values)


class LocalFederation:
    """A one-machine pilot's files and processes: what ``fedcl poc`` runs, and what tests and benchmarks reuse.

    :meth:`prepare` writes every file (site data, certificates, keys, node
    configs, the run config) and starts nothing; :meth:`start` starts the
    SuperLink, registers the sites and starts their SuperNodes in ``group``
    (whoever owns the group stops them); :meth:`submit` and :meth:`wait` run
    one run. Progress lines go to ``out``.
    """

    def __init__(self, plan: PocPlan, group: ProcessGroup, out: TextIO) -> None:
        self.plan = plan
        self.group = group
        self.out = out
        self.workdir = plan.workdir.resolve()
        self.coordinator = self.workdir / "coordinator"
        self.coordinator_home = self.coordinator / "flwr-home"
        self.names = [site_name(index) for index in range(plan.sites)]
        self.folders = dict(zip(self.names, (self.workdir / name for name in self.names)))
        self.timings: dict[str, float] = {}
        self.certs: PkiFiles | None = None
        self.keys: dict[str, SiteKeyFiles] = {}
        self.node_configs: dict[str, SiteNodeConfig] = {}
        self.run_config = ""
        self.config: RunConfig | None = None
        self.connection: Connection | None = None
        self.submitted_at = 0.0

    def say(self, text: str) -> None:
        """One progress line."""
        self.out.write(f"fedcl poc: {text}\n")
        self.out.flush()

    def prepare(self) -> None:
        """Write the sites' data copies, the certificates, the keys, the node configs and the run config; check them."""
        plan = self.plan
        folders = [self.folders[name] for name in self.names]
        data_files = place_site_data(plan.data, folders, force=plan.force, max_records=plan.max_records)
        self.run_config = poc_run_config(plan, data_files, plan.label_column or "label")
        self.config = check_run_config(self.run_config)
        self.say(
            f"{plan.sites} site(s), labels {self.config.labels!r}, {self.config.total_rounds} round(s); "
            f"data copied to {', '.join(str(path) for path in data_files)}"
        )
        if plan.insecure:
            self.say("WARNING: --insecure: plaintext connections and no SuperNode authentication (a local test only)")
        else:
            self.certs = init_pki(self.coordinator / "certs", parse_hosts(LOCALHOST), force=plan.force)
            self.keys = {name: make_site_keys(name, self.folders[name] / "keys", plan.force) for name in self.names}
            self.say(f"CA and SuperLink certificate in {self.certs.folder}; site keys in {self.workdir}/site-*/keys")
        for name, data in zip(self.names, data_files):
            values: dict[str, Any] = {
                "site-name": name,
                "data-path": str(data),
                "state-dir": str(self.folders[name] / "state"),
            }
            if plan.text_column:
                values["text-column"] = plan.text_column
            if plan.label_column:
                values["label-column"] = plan.label_column
            values.update(parse_node_config(plan.site_config))
            self.node_configs[name] = check_node_config(format_config(values))

    def start(self) -> None:
        """Start the SuperLink on a free local port, register every site's key, start and connect every SuperNode."""
        if self.config is None:
            self.prepare()
        port = free_port()
        self.connection = Connection(
            SuperLinkAddress(LOCALHOST, port),
            None if self.certs is None else self.certs.ca_certificate,
            self.certs is None,
        )
        started = time.time()
        start_superlink(
            self.group, self.certs, LOCALHOST, port, self.coordinator_home, log_path=self.coordinator / "superlink.log"
        )
        self.timings["superlink_ready_s"] = time.time() - started
        security = "plaintext, no authentication" if self.certs is None else "TLS, SuperNode authentication"
        self.say(f"SuperLink on {self.connection.address} ({security}); log {self.coordinator / 'superlink.log'}")
        for name, keys in self.keys.items():
            registration = register_site(name, keys.public_key, self.connection, self.coordinator_home)
            self.say(f"{name} registered (node {registration.node_id}, key {registration.fingerprint})")
        started = time.time()
        for name in self.names:
            self.start_supernode(name)
            self.say(f"{name} connected; log {self.folders[name] / 'supernode.log'}")
        self.timings["sites_connected_s"] = time.time() - started

    def start_supernode(self, name: str, prefix: tuple[str, ...] = ()) -> ManagedProcess:
        """Start site ``name``'s SuperNode with its own key, node config and folders (``prefix``: e.g. ``ip netns exec``).

        Raises :class:`PilotError` when it does not connect (as ``start_site``).
        """
        if self.connection is None:
            raise PilotError("start the federation's SuperLink before its sites")
        return start_site(
            self.group,
            self.connection,
            self.keys[name].private_key if name in self.keys else None,
            self.node_configs[name],
            self.folders[name] / "flwr-home",
            runtime_port=free_port(),
            log_path=self.folders[name] / "supernode.log",
            prefix=prefix,
        )

    def submit(self) -> int:
        """Submit the run (``flwr run`` of the fedcl project); return its id."""
        if self.connection is None:
            raise PilotError("start the federation before submitting a run")
        self.submitted_at = time.time()
        run_id = submit_run(self.connection, self.coordinator_home, self.run_config)
        self.timings["submit_s"] = time.time() - self.submitted_at
        self.say(f"run {run_id} submitted; waiting for it to end (log {self.run_log(run_id)})")
        return run_id

    def run_log(self, run_id: int) -> Path:
        """Where the run's ServerApp log is written, each line timed."""
        return self.coordinator / f"run-{run_id}.log"

    def message_timings(self) -> dict[str, float]:
        """Timings from the SuperNodes' live output (seconds, relative to the submission where a time).

        ``first_message_s``: submission to the first message reaching a site;
        ``round_<k>_end_s``: submission to the end of round k (the last site's
        evaluate reply); ``message_mean_s``, ``app_start_wait_mean_s`` and
        ``app_mean_s``: per message, arrival to reply, arrival to its app
        process starting, and app start to reply.
        """
        spans = [message_spans(process.timed_lines()) for process in self.group.processes if process.name in self.names]
        every = [span for site in spans for span in site if span.sent_at is not None]
        if not every:
            return {}
        timings = {"first_message_s": min(span.received_at for span in every) - self.submitted_at}
        for number, ended in enumerate(round_ends(spans), start=1):
            timings[f"round_{number}_end_s"] = ended - self.submitted_at
        started = [span for span in every if span.app_started_at is not None]
        timings["message_mean_s"] = sum(span.seconds or 0.0 for span in every) / len(every)
        if started:
            timings["app_start_wait_mean_s"] = sum(s.app_started_at - s.received_at for s in started) / len(started)
            timings["app_mean_s"] = sum(s.sent_at - s.app_started_at for s in started) / len(started)
        return timings

    def wait(self, run_id: int) -> PocResult:
        """Wait for the run to end (``plan.timeout``); return its outcome, where things are, and the timings."""
        if self.connection is None or self.config is None:
            raise PilotError("start the federation and submit a run first")
        outcome = wait_for_run(
            self.connection,
            self.coordinator_home,
            run_id,
            self.plan.timeout,
            submitted_at=self.submitted_at,
            stream=self.out if self.plan.stream else ProgressLines(self.out),  # a line per round at least
            log_path=self.run_log(run_id),
        )
        rounds = round_timings(outcome.log)
        timings = dict(self.timings)
        timings["run_s"] = outcome.finished_at - self.submitted_at
        timings.update(self.message_timings())
        state_dirs = {name: config.state_dir for name, config in self.node_configs.items()}
        return PocResult(outcome, Path(self.config.output_dir), self.workdir, self.names, state_dirs, rounds, timings)


def run_poc(plan: PocPlan, out: TextIO) -> PocResult:
    """Run the proof of concept described by ``plan``, printing progress lines to ``out``; return its result.

    Every process started is stopped before this returns or raises. Raises
    :class:`PilotError` for a bad input or a step that fails (the message
    names the log to read); a run that ends but not ``finished:completed`` is
    returned (``result.outcome.completed`` is false) with its log named.
    """
    with StopOnSignals(), ProcessGroup() as group:
        federation = LocalFederation(plan, group, out)
        federation.prepare()
        federation.start()
        run_id = federation.submit()
        result = federation.wait(run_id)
    if not result.outcome.completed:
        federation.say(
            f"run {run_id} ended {result.outcome.status} {result.outcome.details}".rstrip()
            + f"; read {federation.run_log(run_id)} and the sites' supernode.log files"
        )
        return result
    federation.say(
        f"run {run_id} {result.outcome.status} in {result.timings['run_s']:.0f} s; results in {result.run_dir} "
        "(summary.json)"
    )
    for name in result.site_names:
        federation.say(f"{name}'s privacy ledger and state: {result.state_dirs[name]}")
    federation.say(
        "timings (s): "
        + ", ".join(f"{key.removesuffix('_s').replace('_', ' ')} {value:.1f}" for key, value in result.timings.items())
        + "; the ServerApp's rounds: "
        + ", ".join(f"{timing.seconds:.1f}" for timing in result.rounds)
    )
    federation.say("every process it started is stopped")
    return result
