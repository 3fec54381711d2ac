"""The pilot as real processes: a TLS SuperLink with SuperNode authentication, sites with their own files.

The integration tests share one local pilot (what `fedcl poc` runs): a TLS
SuperLink, two registered sites each with its own CSV in its own folder, and
a 2-round run of the real model submitted as the fixture starts. The refusal
cases run while that run is in flight (a refused client must never get a
message), then the last test waits for the run and checks its results. Every
process is stopped by the fixture's ``ProcessGroup``, and the fixture checks
that none is left. The fast tests at the end start nothing: they check the
preflight refusals.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import psutil
import pytest
from pilot_data import FAST_RUN_CONFIG, LABELS, write_site_csvs

from client.privacy_ledger import PrivacyLedger
from client.site_policy import SIMULATION_ENV
from client.site_state import SiteState
from fedcl.pilot.cli import main
from fedcl.pilot.connection import Connection, SuperLinkAddress
from fedcl.pilot.errors import PilotError
from fedcl.pilot.node_config import SiteNodeConfig, check_node_config, format_config, parse_node_config
from fedcl.pilot.pki import init_pki, make_site_keys, parse_hosts
from fedcl.pilot.poc import LocalFederation, PocPlan
from fedcl.pilot.processes import ProcessGroup, free_port
from fedcl.pilot.registration import register_site
from fedcl.pilot.site import start_site
from fedcl.pilot.site_data import place_site_data, read_records


def processes_under(folder: Path) -> list[psutil.Process]:
    """Running processes whose command line or FLWR_HOME lies under ``folder`` (what a pilot there started)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            text = " ".join(process.info.get("cmdline") or []) + " " + process.environ().get("FLWR_HOME", "")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if str(folder) in text and process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


class Deployment:
    """A running local pilot (fedcl.pilot.poc.LocalFederation) with its 2-round run already submitted."""

    def __init__(self, root: Path, group: ProcessGroup) -> None:
        self.root = root
        self.group = group
        self.data = write_site_csvs(root / "data", sites=2, per_site=40)
        self.out = io.StringIO()
        plan = PocPlan(
            sites=2,
            data=self.data,
            workdir=root / "pilot",
            run_config=f"{FAST_RUN_CONFIG} labels='{','.join(LABELS)}'",
            timeout=240,
        )
        self.federation = LocalFederation(plan, group, self.out)
        # a simulation launcher's variable in the operator's environment must not reach a real site: if it did, the
        # sites would take its policy (dp false) and their ledgers would record no DP step (checked below)
        os.environ[SIMULATION_ENV] = json.dumps({"state-root": str(root / "wrong-state-root"), "policy": {"dp": False}})
        try:
            self.federation.start()  # TLS SuperLink, both sites registered, both SuperNodes accepted
        finally:
            os.environ.pop(SIMULATION_ENV)
        self.superlink = group.processes[0]
        self.run_id = self.federation.submit()

    @property
    def tls(self) -> Connection:
        assert self.federation.connection is not None
        return self.federation.connection

    def node_config(self, name: str) -> SiteNodeConfig:
        state = self.root / name / "state"
        return check_node_config(
            format_config({"site-name": name, "data-path": str(self.data[0]), "state-dir": str(state)})
        )

    def activations(self) -> int:
        return sum("Activated node_id" in line for line in self.superlink.lines())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    """One TLS SuperLink with 2 registered sites and a run in flight, shared by the cases; all stopped at the end."""
    root = tmp_path_factory.mktemp("deployment")
    with ProcessGroup() as group:
        yield Deployment(root, group)
    assert not processes_under(root), "a process the deployment tests started is still running"


@pytest.mark.integration
@pytest.mark.slow
def test_a_site_with_an_unregistered_key_is_refused(deployment: Deployment) -> None:
    keys = make_site_keys("rogue", deployment.root / "rogue" / "keys")  # made, never registered
    group = ProcessGroup()
    with group, pytest.raises(PilotError, match="not registered"):
        start_site(
            group,
            deployment.tls,
            keys.private_key,
            deployment.node_config("rogue"),
            deployment.root / "rogue" / "home",
            runtime_port=free_port(),
        )
    rogue = group.processes[0]
    assert not rogue.running()
    assert any("2004" in line for line in rogue.lines())  # Flower's "Failed to activate SuperNode"
    assert not any("SuperNode ID" in line or "Receiving" in line for line in rogue.lines())  # no node, no message
    assert any("No SuperNode found with the given public key" in line for line in deployment.superlink.lines())


@pytest.mark.integration
@pytest.mark.slow
def test_a_plaintext_client_is_refused_by_the_tls_superlink(deployment: Deployment) -> None:
    plaintext = Connection(SuperLinkAddress("127.0.0.1", deployment.tls.address.port), None, insecure=True)
    with ProcessGroup() as group:
        client = start_site(
            group,
            plaintext,
            None,
            deployment.node_config("plain"),
            deployment.root / "plain" / "home",
            runtime_port=free_port(),
            wait_connected=False,
            max_retries=1,
        )
        code = client.wait(timeout=60)
    assert code != 0
    assert any("Connection attempt failed" in line for line in client.lines())
    assert not any("SuperNode ID" in line or "Receiving" in line for line in client.lines())


@pytest.mark.integration
@pytest.mark.slow
def test_the_sites_run_without_the_simulation_launchers_variable(deployment: Deployment) -> None:
    sites = [process for process in deployment.group.processes if process.name in ("site-1", "site-2")]
    assert len(sites) == 2
    for site in sites:
        environment = psutil.Process(site.pid).environ()
        assert SIMULATION_ENV not in environment
        assert environment["FLWR_HOME"].startswith(str(deployment.root / "pilot" / site.name))
        assert environment["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


@pytest.mark.integration
@pytest.mark.slow
def test_a_registered_key_registered_again_is_reported_not_refused(deployment: Deployment) -> None:
    keys = deployment.federation.keys["site-1"]
    again = register_site("site-1", keys.public_key, deployment.tls, deployment.root / "coordinator-home")
    assert again.already_registered and again.fingerprint.startswith("SHA256:")


@pytest.mark.integration
@pytest.mark.slow
def test_two_authenticated_sites_with_their_own_files_complete_two_rounds(deployment: Deployment) -> None:
    result = deployment.federation.wait(deployment.run_id)
    assert result.outcome.completed, deployment.out.getvalue()
    assert deployment.activations() == 2  # the two registered sites; the refused clients never got a node
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = {(row["site"], row["round"]) for row in rows if row.get("train_status") == "trained"}
    assert trained == {(site, r) for site in ("site-1", "site-2") for r in (1, 2)}
    workdir = deployment.root / "pilot"
    for index, name in enumerate(("site-1", "site-2")):
        state = result.state_dirs[name]
        assert state == workdir / name / "state"  # the site's own folder, from its node config
        # 2 probe rounds x probe-steps=5 DP steps, recorded by the site itself in its own ledger
        assert PrivacyLedger.load(SiteState(state).ledger).total_steps == 2 * 5
        # each site read its own copy of its own file
        assert read_records(workdir / name / "train.csv") == read_records(deployment.data[index])
    assert not list(result.run_dir.rglob("privacy_ledger.json")), "a ledger was written on the coordinator's side"
    assert "TLS, SuperNode authentication" in deployment.out.getvalue()
    assert [timing.round for timing in result.rounds] == [1, 2]
    timings = {key: round(value, 1) for key, value in result.timings.items()}
    (deployment.root / "timings.json").write_text(json.dumps({**timings, "rounds": [t.seconds for t in result.rounds]}))
    print(f"\npilot timings: {timings}; round seconds {[t.seconds for t in result.rounds]}")


# ---- fast: preflight refusals, no process started ----


def test_node_config_names_the_site_its_data_and_its_state(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(PilotError, match="'data-path', 'state-dir'"):
        check_node_config("site-name='a'")
    with pytest.raises(PilotError, match="no such file"):
        check_node_config(f"site-name='a' data-path='{tmp_path / 'missing.csv'}' state-dir='{tmp_path}/s'")
    with pytest.raises(PilotError, match="quote text values"):
        check_node_config("site-name=a data-path=x.csv state-dir=s")
    checked = check_node_config("site-name='a' data-path='train.csv' state-dir='s' dp=false", base=tmp_path)
    assert checked.data_path == data and checked.state_dir == tmp_path / "s"  # made absolute
    assert parse_node_config(checked.to_argument()) == {  # what flower-supernode will parse back
        "site-name": "a",
        "data-path": str(data),
        "state-dir": str(tmp_path / "s"),
        "dp": False,
    }


def test_site_start_refuses_in_one_line_before_starting_anything(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    certs = init_pki(tmp_path / "certs", parse_hosts("localhost"))
    port = free_port()  # nothing listens there
    config = f"site-name='a' data-path='{tmp_path / 'none.csv'}' state-dir='{tmp_path / 's'}'"
    args = ["site", "start", "--superlink", f"127.0.0.1:{port}", "--root-cert", str(certs.ca_certificate)]
    assert main([*args, "--node-config", config]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "none.csv").write_text("text,label\na,x\n")
    assert main([*args, "--node-config", config]) == 2  # no --key with TLS on
    assert "--key" in capsys.readouterr().err
    keys = make_site_keys("a", tmp_path / "keys")
    assert main([*args, "--key", str(keys.private_key), "--node-config", config]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot reach the SuperLink" in error[0]
    assert main(["site", "start", "--superlink", f"127.0.0.1:{port}", "--node-config", config]) == 2
    assert "--root-cert" in capsys.readouterr().err


def test_run_submit_needs_labels_and_an_absolute_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    certs = init_pki(tmp_path / "certs", parse_hosts("localhost"))
    args = ["run", "submit", "--superlink", f"127.0.0.1:{free_port()}", "--root-cert", str(certs.ca_certificate)]
    assert main([*args, "--run-config", "output-dir='/srv/runs/1'"]) == 2
    assert "labels" in capsys.readouterr().err
    assert main([*args, "--run-config", "labels='a,b' output-dir='runs/1'"]) == 2
    assert "absolute" in capsys.readouterr().err
    assert main([*args, "--run-config", "labels='a,b' output-dir='/srv/runs/1' num-roundz=3"]) == 2
    assert "num-roundz" in capsys.readouterr().err


def test_one_file_is_split_into_disjoint_site_files_that_cover_it(tmp_path: Path) -> None:
    source = tmp_path / "all.csv"
    source.write_text('text,label\n"line one\nwith a newline",a\n' + "".join(f"t{i},b\n" for i in range(9)))
    folders = [tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"]
    files = place_site_data([source], folders)
    header, records = read_records(source)
    parts = [read_records(path) for path in files]
    assert all(part[0] == header for part in parts)
    assert sorted(row for _, rows in parts for row in rows) == sorted(records)  # every record exactly once
    assert [len(rows) for _, rows in parts] == [4, 3, 3]
    with pytest.raises(PilotError, match="--force"):
        place_site_data([source], folders)
    capped = place_site_data([source], folders, force=True, max_records=2)  # a sample of 2 per site, still disjoint
    rows = [row for path in capped for row in read_records(path)[1]]
    assert len(rows) == 6 and len({tuple(row) for row in rows}) == 6 and all(row in records for row in rows)


def test_poc_fills_in_the_sites_the_output_dir_and_the_labels_found_in_the_data(tmp_path: Path) -> None:
    from fedcl.pilot.poc import poc_run_config

    data = tmp_path / "all.csv"
    data.write_text("text,label\na,treatment\nb,symptoms\nc,treatment\n")
    plan = PocPlan(sites=3, data=[data], workdir=tmp_path / "w", run_config="num-rounds=2")
    values = parse_node_config(poc_run_config(plan, [data], "label"))
    assert values["labels"] == "symptoms,treatment" and values["num-sites"] == 3 and values["num-rounds"] == 2
    assert Path(values["output-dir"]).is_absolute() and Path(values["output-dir"]).is_relative_to(tmp_path / "w")
    given = PocPlan(sites=3, data=[data], workdir=tmp_path / "w", run_config="labels='x,y' num-sites=2")
    assert parse_node_config(poc_run_config(given, [data], "label"))["labels"] == "x,y"  # what is given wins


CHILD_WITH_DETACHED_GRANDCHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True,
)
print("grandchild", grandchild.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.integration
def test_a_process_group_stops_detached_descendants_even_those_ignoring_sigterm(tmp_path: Path) -> None:
    """Flower's SuperExec runs in a session of its own: stopping must find it by ancestry and SIGKILL what ignores TERM."""
    with ProcessGroup() as group:
        parent = group.start(
            "parent", [sys.executable, "-c", CHILD_WITH_DETACHED_GRANDCHILD], {}, log_path=tmp_path / "p.log"
        )
        grandchild = int(parent.wait_for(r"grandchild \d+", 30).split()[1])
        assert psutil.Process(grandchild).is_running()
        assert psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE
        group.processes[0].stop(timeout=2)
    assert not parent.running()
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert "grandchild" in (tmp_path / "p.log").read_text()  # the log has the line, with its time in front


def test_flower_processes_get_the_pilot_environment(tmp_path: Path) -> None:
    from fedcl.pilot.environment import flower_environment

    base = {"PATH": "/usr/bin", SIMULATION_ENV: "{}", "HF_HUB_OFFLINE": "0"}
    environment = flower_environment(tmp_path / "home", base)
    assert SIMULATION_ENV not in environment
    assert environment["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert environment["FLWR_HOME"] == str((tmp_path / "home").resolve()) and (tmp_path / "home").is_dir()
    assert environment["FLWR_TELEMETRY_ENABLED"] == "0" and environment["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert environment["HF_HUB_OFFLINE"] == "0"  # an operator's explicit choice is kept; the default is offline
    assert flower_environment(tmp_path / "home", {"PATH": ""})["HF_HUB_OFFLINE"] == "1"


def test_a_site_start_retries_only_a_connection_the_superlink_never_answered():
    from fedcl.pilot.processes import ProcessFailed
    from fedcl.pilot.site import transient

    timed_out = "site-2 reported: ERROR: Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
    refused = (
        "ERROR: Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n[code: 2004] Node not found"
    )
    assert transient(ProcessFailed(timed_out))
    assert not transient(ProcessFailed(refused))
    assert not transient(ProcessFailed("ERROR: Exit Code: 2004"))
