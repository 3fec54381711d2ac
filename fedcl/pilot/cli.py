"""The `fedcl` command: certificates, site keys, the SuperLink, the sites, runs, a one-machine proof of concept, reports.

Every subcommand checks its inputs first and stops with one line naming the
fix (exit code 2); a process or run that fails exits 1. TLS and SuperNode
authentication are on unless ``--insecure`` is given (a local test only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from fedcl.pilot.commands import DEFAULT_SITE_RUNTIME_PORT, DEFAULT_SUPERLINK_PORT
from fedcl.pilot.connection import connection_from_args
from fedcl.pilot.environment import default_flwr_home
from fedcl.pilot.errors import PilotError
from fedcl.pilot.node_config import check_node_config
from fedcl.pilot.pki import (
    CA_DAYS,
    SERVER_DAYS,
    PkiFiles,
    certificate_fingerprint,
    init_pki,
    load_site_public_key,
    make_site_keys,
    parse_hosts,
    public_key_fingerprint,
)
from fedcl.pilot.processes import ProcessGroup, StopOnSignals
from fedcl.run_config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
INSECURE_WARNING = (
    "WARNING: --insecure: plaintext, and no SuperNode authentication (Flower needs TLS for it): "
    "anyone who reaches this port can join or listen. Use it for a local test only."
)

PKI_INIT_HELP = """\
Make the pilot's certificate authority (CA) and the SuperLink's TLS certificate.

Run once, on the coordinator's machine. Files written to --out:
  ca.pem          the CA certificate: send a copy to every site (public)
  ca.key          the CA's private key (0600): keep it offline, e.g. on an encrypted USB stick
  superlink.pem   the SuperLink's certificate, valid for --hosts (and localhost, 127.0.0.1)
  superlink.key   its private key (0600): stays on the SuperLink's machine

example:
  fedcl pki init --out /etc/fedcl/certs --hosts superlink.example.org,10.0.0.5
"""

SITE_KEYS_HELP = """\
Make a site's authentication key pair (ECDSA P-384, OpenSSH format).

Run on the site's own machine. Files written to --out:
  NAME.key   the private key (0600): never leaves the site; `fedcl site start --key` uses it
  NAME.pub   the public key: send it to the coordinator (e-mail is fine), who registers it

The fingerprint printed at the end lets the coordinator check, by phone, that the
.pub they received is yours.

example:
  fedcl site keys hospital-a --out /etc/fedcl/keys
"""

SITE_REGISTER_HELP = """\
Register a site's public key with the SuperLink (coordinator's side).

Only SuperNodes whose key is registered can join. Compare the fingerprint
printed here with the one the site read out when it made its keys.

example:
  fedcl site register hospital-a hospital-a.pub --superlink superlink.example.org:8000 --root-cert ca.pem
"""

SITE_START_HELP = """\
Start this site's SuperNode (runs in the foreground; Ctrl-C stops it).

The node config names the site's own files and policy; required:
  site-name   the name the site was registered under
  data-path   the site's training data: a .csv or .jsonl file with a text and a label column
  state-dir   a folder the site keeps and backs up: its privacy ledger lives there
optional: test-path or test-fraction, text-column (default text), label-column (default label),
group-column, device (auto|cpu|cuda), dp, target-epsilon, delta, nominal-records.
Quote text values. The site's data never leaves this machine; only model updates do.

example:
  fedcl site start --superlink superlink.example.org:8000 --root-cert ca.pem --key hospital-a.key \\
      --node-config "site-name='hospital-a' data-path='/data/fedcl/train.csv' state-dir='/var/lib/fedcl/state'"
"""

SUPERLINK_START_HELP = """\
Start the SuperLink, the coordinator's server that sites connect to (foreground; Ctrl-C stops it).

TLS and SuperNode authentication are on: only registered sites can join.
The port also serves Flower's Control API (register sites, submit runs), which
has no login in this Flower build: let only the sites' and the coordinator's
addresses through the firewall.

example:
  fedcl superlink start --certs /etc/fedcl/certs --database /var/lib/fedcl/superlink.db
"""

RUN_SUBMIT_HELP = """\
Submit a fedcl run to the SuperLink and wait for it to end (coordinator's side).

The run config must declare the federation's public label set (labels="a,b,c")
and an absolute output-dir on the SuperLink's machine, where the report goes.

example:
  fedcl run submit --superlink superlink.example.org:8000 --root-cert ca.pem --stream \\
      --run-config "labels='treatment,symptoms,information' num-sites=3 output-dir='/srv/fedcl/runs/pilot-1'"
"""

POC_HELP = """\
A proof of concept on this one machine, with real processes: makes the certificates and
each site's keys and folder (its own copy of its data), starts the SuperLink with TLS and
SuperNode authentication, registers the sites, starts one SuperNode per site, submits a run,
waits for it to end, prints where the results are, and stops everything it started.

example:
  fedcl poc --sites 2 --data ../shared/data/medquad/medquad.csv --text-column answer --label-column qtype \\
      --max-records 200 --workdir /tmp/fedcl-poc \\
      --run-config "probe-rounds=2 num-rounds=0 probe-steps=5 max-length=32"
"""


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    parser.add_argument(
        "--root-cert", metavar="CA.pem", help="the pilot CA's certificate (ca.pem from the coordinator)"
    )
    parser.add_argument("--insecure", action="store_true", help="plaintext, no TLS (a local test only)")


def _add_flwr_home(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument(
        "--flwr-home",
        type=Path,
        metavar="DIR",
        help=f"Flower's folder for this command (default {default_flwr_home(role)}; $FEDCL_FLWR_HOME/<role> if set)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedcl`` command and its subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="fedcl",
        description="Run a fedcl pilot across sites: certificates, site keys, the SuperLink, the sites, runs; "
        "and look at what a run did (report, compare).",
        formatter_class=formatter,
        epilog="Order of a pilot: pki init -> site keys (each site) -> superlink start -> site register (each site) "
        "-> site start (each site) -> run submit. `fedcl poc` does all of it on one machine.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pki = commands.add_parser("pki", help="certificates (coordinator)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    init = pki.add_parser(
        "init", help="make the CA and the SuperLink certificate", description=PKI_INIT_HELP, formatter_class=formatter
    )
    init.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the four files (made 0700)")
    init.add_argument(
        "--hosts",
        required=True,
        metavar="HOST[,HOST...]",
        help="names and addresses sites use to reach the SuperLink (localhost and 127.0.0.1 are always added)",
    )
    init.add_argument(
        "--reuse-ca", action="store_true", help="keep ca.pem/ca.key in --out; issue a new SuperLink certificate"
    )
    init.add_argument(
        "--days", type=int, default=SERVER_DAYS, help=f"SuperLink certificate lifetime (default {SERVER_DAYS})"
    )
    init.add_argument("--ca-days", type=int, default=CA_DAYS, help=f"CA lifetime (default {CA_DAYS})")
    init.add_argument("--force", action="store_true", help="replace existing files (sites then need the new ca.pem)")

    site = commands.add_parser("site", help="a site's keys, registration and SuperNode").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    keys = site.add_parser("keys", help="make a site's key pair", description=SITE_KEYS_HELP, formatter_class=formatter)
    keys.add_argument("name", metavar="NAME", help="the site's name, e.g. hospital-a")
    keys.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for NAME.key and NAME.pub")
    keys.add_argument("--force", action="store_true", help="replace an existing pair (register the new .pub again)")

    register = site.add_parser(
        "register", help="register a site's public key", description=SITE_REGISTER_HELP, formatter_class=formatter
    )
    register.add_argument("name", metavar="NAME", help="the site's name")
    register.add_argument("public_key", type=Path, metavar="PUBKEY", help="the site's NAME.pub")
    _add_connection(register)
    _add_flwr_home(register, "coordinator")

    start = site.add_parser(
        "start", help="start the site's SuperNode", description=SITE_START_HELP, formatter_class=formatter
    )
    _add_connection(start)
    start.add_argument("--key", type=Path, metavar="SITE_KEY", help="the site's private key (NAME.key)")
    start.add_argument("--node-config", required=True, metavar='"KEY=VALUE ..."', help="the site's files and policy")
    start.add_argument(
        "--runtime-port",
        type=int,
        default=DEFAULT_SITE_RUNTIME_PORT,
        help=f"local port for the site's app processes (default {DEFAULT_SITE_RUNTIME_PORT}; one per SuperNode)",
    )
    start.add_argument("--log-file", type=Path, metavar="FILE", help="also write the output here, each line timed")
    _add_flwr_home(start, "<site-name>")

    superlink = commands.add_parser("superlink", help="the coordinator's SuperLink").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    sl_start = superlink.add_parser(
        "start", help="start the SuperLink", description=SUPERLINK_START_HELP, formatter_class=formatter
    )
    sl_start.add_argument("--certs", type=Path, metavar="DIR", help="the folder `fedcl pki init` wrote")
    sl_start.add_argument(
        "--insecure", action="store_true", help="plaintext and no site authentication (local test only)"
    )
    sl_start.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    sl_start.add_argument(
        "--port", type=int, default=DEFAULT_SUPERLINK_PORT, help=f"port (default {DEFAULT_SUPERLINK_PORT})"
    )
    sl_start.add_argument(
        "--database",
        type=Path,
        metavar="FILE",
        help="keep registered sites and runs in this file across restarts (default: in memory, lost on stop)",
    )
    sl_start.add_argument("--log-file", type=Path, metavar="FILE", help="also write the output here, each line timed")
    _add_flwr_home(sl_start, "superlink")

    run = commands.add_parser("run", help="runs").add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = run.add_parser(
        "submit", help="submit a run and wait for it", description=RUN_SUBMIT_HELP, formatter_class=formatter
    )
    _add_connection(submit)
    submit.add_argument("--run-config", required=True, metavar='"KEY=VALUE ..."', help="run settings (see README)")
    submit.add_argument(
        "--stream", action="store_true", help="show Flower's whole log while it runs (default: one line per round)"
    )
    submit.add_argument("--no-wait", action="store_true", help="print the run id and return at once")
    submit.add_argument(
        "--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the end (default a day)"
    )
    _add_flwr_home(submit, "coordinator")

    poc = commands.add_parser(
        "poc", help="the whole pilot on this machine", description=POC_HELP, formatter_class=formatter
    )
    poc.add_argument("--sites", type=int, required=True, metavar="N", help="number of sites")
    poc.add_argument(
        "--data", type=Path, action="append", required=True, metavar="FILE", help="one file to split, or one per site"
    )
    poc.add_argument("--workdir", type=Path, required=True, metavar="DIR", help="where everything is written")
    poc.add_argument("--run-config", default="", metavar='"KEY=VALUE ..."', help="run settings (labels: from the data)")
    poc.add_argument("--site-config", default="", metavar='"KEY=VALUE ..."', help="node-config keys every site gets")
    poc.add_argument("--text-column", default="", help="the data's text column (default text)")
    poc.add_argument("--label-column", default="", help="the data's label column (default label)")
    poc.add_argument(
        "--max-records", type=int, default=0, metavar="N", help="at most N records per site (default 0: all)"
    )
    poc.add_argument("--insecure", action="store_true", help="plaintext and no site authentication")
    poc.add_argument("--force", action="store_true", help="replace certificates, keys and data copies in --workdir")
    poc.add_argument("--stream", action="store_true", help="show the run's log while it runs")
    poc.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default 3600)")

    report = commands.add_parser(
        "report", help="write a run's report page and figures", description=REPORT_HELP, formatter_class=formatter
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory a run printed")
    compare = commands.add_parser(
        "compare", help="compare runs: one table, overlaid curves", description=COMPARE_HELP, formatter_class=formatter
    )
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="two or more run directories")
    compare.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: ./comparison-<date>-<time>)")
    return parser


REPORT_HELP = """\
Write (again) a run's report from its run directory alone: RUN_DIR/report/index.html
with PNG figures (accuracy per site, epsilon per site against the budget, the
continual accuracy matrix, bytes per round), a privacy statement in plain words,
each site's numbers, every round a site did not train, and the configuration.
Every run writes it when it ends; this command redraws it (after an interrupted
run, or on another machine with a copy of the folder).

example:
  fedcl report runs/20261129-162853
  python -m fedcl report runs/20261129-162853
"""

COMPARE_HELP = """\
Compare runs: one table (final accuracy, largest epsilon, continual scores,
rounds, time, traffic) printed and written as comparison.md and comparison.json,
plus each run's mean accuracy and largest epsilon over rounds overlaid, in
--out (index.html shows it all).

example:
  fedcl compare runs/bench_continual/medquad-naive runs/bench_continual/medquad-ncm --out runs/compare-medquad
"""


def pki_init(args: argparse.Namespace, out: TextIO) -> int:
    """``fedcl pki init``."""
    hosts = parse_hosts(args.hosts)
    files = init_pki(
        args.out, hosts, force=args.force, reuse_ca=args.reuse_ca, ca_days=args.ca_days, server_days=args.days
    )
    out.write(
        f"fedcl: SuperLink certificate for {', '.join(hosts)} in {files.server_certificate} (key {files.server_key})\n"
        f"fedcl: send {files.ca_certificate} to every site; keep {files.ca_key} offline\n"
        f"fedcl: the CA's fingerprint (sites check it by phone): SHA256 {certificate_fingerprint(files.ca_certificate)}\n"
    )
    return EXIT_OK


def site_keys(args: argparse.Namespace, out: TextIO) -> int:
    """``fedcl site keys``."""
    files = make_site_keys(args.name, args.out, force=args.force)
    fingerprint = public_key_fingerprint(load_site_public_key(files.public_key))
    out.write(
        f"fedcl: private key {files.private_key} (0600, stays here); public key {files.public_key}\n"
        f"fedcl: send {files.public_key.name} to the coordinator; its fingerprint is {fingerprint}\n"
    )
    return EXIT_OK


def site_register(args: argparse.Namespace, out: TextIO) -> int:
    """``fedcl site register``."""
    from fedcl.pilot.registration import register_site

    connection = connection_from_args(args.superlink, args.root_cert, args.insecure)
    home = args.flwr_home or default_flwr_home("coordinator")
    done = register_site(args.name, args.public_key, connection, home)
    if done.already_registered:
        out.write(f"fedcl: {args.name}'s key ({done.fingerprint}) is already registered; nothing to do\n")
    else:
        out.write(f"fedcl: {args.name} registered as node {done.node_id} (key {done.fingerprint})\n")
    return EXIT_OK


def _foreground(process_name: str, group: ProcessGroup) -> int:
    """Wait for the group's one process to exit; Ctrl-C or SIGTERM stops it. Its exit code, 0 when stopped by us."""
    process = group.processes[0]
    try:
        return process.wait()
    except KeyboardInterrupt:
        sys.stderr.write(f"\nfedcl: stopping {process_name}\n")
        process.stop()
        return EXIT_OK


def site_start(args: argparse.Namespace, out: TextIO) -> int:
    """``fedcl site start``."""
    from fedcl.pilot.site import start_site

    connection = connection_from_args(args.superlink, args.root_cert, args.insecure)
    node_config = check_node_config(args.node_config)
    if args.insecure:
        out.write(f"fedcl: {INSECURE_WARNING}\n")
    home = args.flwr_home or default_flwr_home(node_config.site_name)
    with StopOnSignals(), ProcessGroup() as group:
        start_site(
            group,
            connection,
            args.key,
            node_config,
            home,
            runtime_port=args.runtime_port,
            log_path=args.log_file,
            echo=out,
            wait_connected=False,
        )
        trust = "" if connection.root_cert is None else f" (CA SHA256 {certificate_fingerprint(connection.root_cert)})"
        out.write(
            f"fedcl: site {node_config.site_name} connecting to {connection.address}{trust}; data "
            f"{node_config.data_path}, state {node_config.state_dir}. Ctrl-C stops it.\n"
        )
        out.flush()
        return _foreground(node_config.site_name, group)


def superlink_start(args: argparse.Namespace, out: TextIO) -> int:
    """``fedcl superlink start``."""
    from fedcl.pilot.superlink import check_server_certificates, site_facing_names, start_superlink

    if args.insecure and args.certs:
        raise PilotError("--insecure turns TLS off: drop --certs, or drop --insecure (TLS is the default)")
    if not args.insecure and not args.certs:
        raise PilotError("give --certs DIR (the folder `fedcl pki init` wrote), or --insecure for a local test")
    certs = None if args.insecure else PkiFiles(args.certs.resolve())
    names = check_server_certificates(certs) if certs else []
    if args.insecure:
        out.write(f"fedcl: {INSECURE_WARNING}\n")
    home = args.flwr_home or default_flwr_home("superlink")
    with StopOnSignals(), ProcessGroup() as group:
        start_superlink(
            group, certs, args.host, args.port, home, database=args.database, log_path=args.log_file, echo=out
        )
        remote = site_facing_names(names) or ["<this machine's address>"]
        if certs is None:
            out.write(
                f"fedcl: SuperLink ready (plaintext) on {args.host}:{args.port}. Sites connect with: fedcl site start "
                f"--superlink {remote[0]}:{args.port} --insecure --node-config ...\n"
            )
        else:
            out.write(
                f"fedcl: SuperLink ready on {args.host}:{args.port} (TLS, SuperNode authentication). Sites connect with:\n"
                f"  fedcl site start --superlink {remote[0]}:{args.port} --root-cert ca.pem --key SITE.key "
                "--node-config \"site-name='...' data-path='...' state-dir='...'\"\n"
                f"  (the certificate is valid for: {', '.join(names)})\n"
                "fedcl: register each site's key first: fedcl site register NAME NAME.pub "
                f"--superlink {remote[0]}:{args.port} --root-cert {certs.ca_certificate}\n"
            )
        if args.database is None:
            out.write(
                "fedcl: note: the SuperLink keeps registered sites and runs in memory only; "
                "pass --database FILE to keep them across restarts\n"
            )
        out.flush()
        return _foreground("the SuperLink", group)


def run_submit(args: argparse.Namespace, out: TextIO) -> int:
    """``fedcl run submit``."""
    from fedcl.pilot.runs import ProgressLines, check_run_config, submit_run, wait_for_run

    connection = connection_from_args(args.superlink, args.root_cert, args.insecure)
    config = check_run_config(args.run_config)
    if args.insecure:
        out.write(f"fedcl: {INSECURE_WARNING}\n")
    home = args.flwr_home or default_flwr_home("coordinator")
    submitted_at = time.time()
    run_id = submit_run(connection, home, args.run_config)
    out.write(f"fedcl: run {run_id} submitted; its report will be in {config.output_dir} on the SuperLink's machine\n")
    out.flush()
    if args.no_wait:
        return EXIT_OK
    try:
        with StopOnSignals():
            outcome = wait_for_run(
                connection,
                home,
                run_id,
                args.timeout,
                submitted_at=submitted_at,
                stream=out if args.stream else ProgressLines(out),
            )
    except KeyboardInterrupt:
        sys.stderr.write(
            f"\nfedcl: stopped waiting; run {run_id} keeps going on the SuperLink "
            f"(`FLWR_HOME={home} flwr stop {run_id} fedcl-pilot` ends it)\n"
        )
        return 130
    details = f" ({outcome.details})" if outcome.details and outcome.details != "N/A" else ""
    out.write(
        f"fedcl: run {run_id} {outcome.status}{details} after {outcome.finished_at - submitted_at:.0f} s; report "
        f"{Path(config.output_dir) / 'report' / 'index.html'} on the SuperLink's machine (summary.json beside it)\n"
    )
    return EXIT_OK if outcome.completed else EXIT_FAILED


def poc(args: argparse.Namespace, out: TextIO) -> int:
    """``fedcl poc``."""
    from fedcl.pilot.poc import PocPlan, run_poc

    plan = PocPlan(
        sites=args.sites,
        data=list(args.data),
        workdir=args.workdir,
        run_config=args.run_config,
        site_config=args.site_config,
        text_column=args.text_column,
        label_column=args.label_column,
        max_records=args.max_records,
        insecure=args.insecure,
        force=args.force,
        timeout=args.timeout,
        stream=args.stream,
    )
    result = run_poc(plan, out)
    summary = result.run_dir / "summary.json"
    if summary.is_file():
        accuracy = json.loads(summary.read_text(encoding="utf-8")).get("accuracy")
        shown = "none (nothing was evaluated)" if accuracy is None else f"{accuracy:.3f}"
        out.write(f"fedcl poc: final mean accuracy {shown}; report {result.run_dir / 'report' / 'index.html'}\n")
    return EXIT_OK if result.outcome.completed else EXIT_FAILED


def report(args: argparse.Namespace, out: TextIO) -> int:
    """``fedcl report``."""
    from server.report_page import write_report
    from server.run_record import NotARunDirectory

    try:
        page = write_report(args.run_dir)
    except NotARunDirectory as err:
        raise PilotError(str(err)) from None
    out.write(f"fedcl: report {page} (open it in a browser; the PNG figures are beside it)\n")
    return EXIT_OK


def compare(args: argparse.Namespace, out: TextIO) -> int:
    """``fedcl compare``."""
    from server.run_comparison import compare_runs

    folder = args.out or Path(f"comparison-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        done = compare_runs(args.run_dirs, folder)
    except ValueError as err:  # NotARunDirectory included
        raise PilotError(str(err)) from None
    out.write(done.markdown)
    out.write(f"fedcl: comparison in {done.folder / 'index.html'} (table: comparison.md, curves: accuracy.png)\n")
    return EXIT_OK


HANDLERS = {
    ("pki", "init"): pki_init,
    ("site", "keys"): site_keys,
    ("site", "register"): site_register,
    ("site", "start"): site_start,
    ("superlink", "start"): superlink_start,
    ("run", "submit"): run_submit,
    ("poc", None): poc,
    ("report", None): report,
    ("compare", None): compare,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedcl`` console script; returns the exit code (0 ok, 1 failed, 2 wrong input)."""
    args = build_parser().parse_args(argv)
    handler = HANDLERS[(args.command, getattr(args, "action", None))]
    try:
        return handler(args, sys.stdout)
    except (PilotError, ConfigError) as err:
        sys.stderr.write(f"fedcl: error: {err}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\nfedcl: interrupted; every process this command started is stopped\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
