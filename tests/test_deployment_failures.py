"""A real deployment (TLS SuperLink, authenticated SuperNodes as processes) losing sites, and getting them back.

Two runs, each shared by the cases that read it (every process is stopped,
and the namespaces deleted, before the cases read the results):

- ``crashes`` (loopback, 3 sites, ``min-replies=2``: a round goes on without
  one site): site-2's SuperNode is SIGKILLed with everything it started right
  after it answered round 1, and restarted with its own key, node config and
  state folder; site-3 is SIGKILLed in the middle of its round-2 training and
  never comes back. Round 2 (only site-1 left) fails, round 3 waits for site-2.
- ``network`` (network namespaces, 2 sites, ``min-replies=0``: every site):
  the SuperLink on its own "host" at a real (veth) address its certificate
  names, each site in its own namespace; site-2's link is cut while it trains
  in round 2 and restored once the server has given up on it; round 2 fails,
  round 3 waits for site-2.

Why these numbers: a site killed without signing off is refused a restart
(and stays counted as connected) until Flower 1.42 misses two of its
heartbeats, 38-60 s (the interval is fixed; no flag shortens it); a site back
on the network re-announces itself at its next heartbeat, up to ~25 s later
(backoff). A round with ``min-replies=1`` does not wait for either, so a
test that relied on the round pace would race; here the rounds after the
failure need the returning site (``min-replies``), so the server waits for it
up to ``round-timeout``, whatever the pace. Each message costs a new app
process here (imports and a model load: message to reply took 10-20 s on 2
cores), so each run has the fewest rounds that show the failure: 1 (before),
2 (the failure), 3 (the return); ROUND_TIMEOUT leaves twice a healthy reply's
time and, added to a round's other waits, covers a restart. The file takes
about 6 minutes here (crashes ~3, network ~3).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pilot_data import LABELS, write_site_csvs
from pilot_failures import (
    crash,
    ledger,
    metric_rows,
    node_id,
    opacus_epsilon,
    restart_site,
    site_processes,
    site_rows,
    spans,
    wait_for_span,
)
from pilot_netns import Topology, why_unavailable
from test_deployment import processes_under

from fedcl.pilot.connection import Connection, SuperLinkAddress
from fedcl.pilot.pki import certificate_names, init_pki, parse_hosts
from fedcl.pilot.poc import LocalFederation, PocPlan, PocResult
from fedcl.pilot.processes import ManagedProcess, ProcessGroup, free_port
from fedcl.pilot.registration import register_site
from fedcl.pilot.superlink import start_superlink

PROBE_STEPS = 5  # DP steps per trained round: what each site's ledger must add per round it trained
ROUNDS = 3  # before, during and after the failure
ROUND_TIMEOUT = 40.0  # s; see the module docstring
SLACK = 20.0  # s: the SuperNodes poll every 3 s, the server polls replies, writes its checkpoint and metrics
EVENT_TIMEOUT = 300.0  # s to wait for one awaited message (a round is ~1 min; the first one also loads everything)
RESTART_TIMEOUT = 150.0  # s: Flower refuses the restart for up to 60 s after the crash; each try takes ~6 s


@dataclass
class Outcome:
    """What a failure run left: the federation, its result, and the times the failures were done."""

    federation: LocalFederation
    result: PocResult
    events: dict[str, float] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)

    def site(self, name: str) -> list[ManagedProcess]:
        """The site's SuperNode processes that were accepted, in order (one, or the crashed one and its restart)."""
        return site_processes(self.federation, name)

    def summary(self) -> dict:
        """summary.json of the run."""
        return json.loads((self.result.run_dir / "summary.json").read_text())


def plan(root: Path, sites: int, min_replies: int) -> PocPlan:
    """A pilot of ``sites`` sites with 40 MedQuAD answers each (a few DP steps, fast to embed), ROUNDS rounds.

    The probe recipe only (frozen features and a DP linear head: the
    fastest round there is); ``max-failed-rounds=3``: a run survives the one
    failed round these scenarios cause.
    """
    data = write_site_csvs(root / "data", sites=sites, per_site=40)
    run_config = (
        f'recipe="probe-then-lora" probe-rounds={ROUNDS} num-rounds=0 probe-steps={PROBE_STEPS} max-length=32 '
        f"min-replies={min_replies} round-timeout={ROUND_TIMEOUT} max-failed-rounds=3 labels='{','.join(LABELS)}'"
    )
    return PocPlan(sites=sites, data=data, workdir=root / "pilot", run_config=run_config, timeout=900)


def gaps(process: ManagedProcess) -> list[tuple[str, str, float]]:
    """For a site present throughout: (message kind, next kind, seconds between their arrivals), in order."""
    received = spans([process])
    return [(a.kind, b.kind, b.received_at - a.received_at) for a, b in zip(received, received[1:])]


def check_waits_are_bounded(result: PocResult, present: ManagedProcess) -> None:
    """Every wait of every round ended within ROUND_TIMEOUT + SLACK, whoever was lost.

    A round has up to three waits, each bounded by ``round-timeout``: for
    enough connected sites, for the training replies, for the evaluation
    replies. ``present`` (a site there all along) measures them: from its
    train message to its evaluate message is the training wait; from its
    evaluate message to the next train message, the evaluation wait plus the
    wait for sites. The server's own round durations stay within the three.
    """
    for kind, following, seconds in gaps(present):
        bound = ROUND_TIMEOUT + SLACK if kind == "train" else 2 * ROUND_TIMEOUT + SLACK
        assert seconds <= bound, f"{present.name} waited {seconds:.0f} s from its {kind} to its {following} message"
    assert [timing.round for timing in result.rounds] == list(range(1, ROUNDS + 1))
    for timing in result.rounds:
        assert timing.seconds <= 3 * ROUND_TIMEOUT + SLACK, timing


def check_ledger_continued(result: PocResult, site: str, train_messages: int) -> tuple[list[float], object]:
    """The site's ledger counts PROBE_STEPS per train message it ran, its reports never go back, epsilon agrees.

    ``train_messages`` is read from the site's own SuperNode output (the
    reference). Returns the epsilons it reported, in round order, and the ledger.
    """
    rows = site_rows(result.run_dir, site)
    state = ledger(result.state_dirs[site])
    assert state.total_steps == PROBE_STEPS * train_messages, (state.history, train_messages)
    reported = [rows[r]["dp_steps_total"] for r in sorted(rows) if rows[r].get("dp_steps_total") is not None]
    assert reported == sorted(reported) and reported[-1] == state.total_steps, reported
    epsilons = [rows[r]["epsilon"] for r in sorted(rows) if rows[r].get("epsilon") is not None]
    assert epsilons[-1] > epsilons[0] > 0, epsilons
    fresh = opacus_epsilon(state.history, state.filter_order, state.delta)
    assert math.isclose(state.epsilon(), fresh, rel_tol=1e-9)
    assert math.isclose(epsilons[-1], fresh, rel_tol=1e-6), (epsilons, fresh)
    return epsilons, state


# ---- the crashes run: one site crashes and restarts, one crashes for good ----


def run_crashes(root: Path) -> Outcome:
    """Run the crashes scenario in ``root`` and return what it left; every process is stopped when it returns."""
    out = io.StringIO()
    with ProcessGroup() as group:
        federation = LocalFederation(plan(root, 3, min_replies=2), group, out)
        federation.start()
        run_id = federation.submit()
        first = {name: process for process in group.processes if (name := process.name) in federation.names}
        events: dict[str, float] = {}
        facts: dict[str, object] = {"node_id_before": node_id(first["site-2"])}
        wait_for_span(first["site-2"], "evaluate", 1, EVENT_TIMEOUT, sent=True)  # site-2 has answered round 1
        crash(first["site-2"])
        events["site-2 crashed"] = time.time()
        wait_for_span(first["site-3"], "train", 2, EVENT_TIMEOUT)  # round 2 has reached site-3 ...
        time.sleep(3)  # ... and its app process has started training
        crash(first["site-3"])
        events["site-3 crashed"] = time.time()
        restarted, attempts = restart_site(federation, "site-2", timeout=RESTART_TIMEOUT)
        events["site-2 back"] = time.time()
        facts.update({"restart_attempts": attempts, "node_id_after": node_id(restarted)})
        result = federation.wait(run_id)
    return Outcome(federation, result, events, facts)


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """3 sites, min-replies=2: site-2 crashes after round 1 and restarts, site-3 crashes mid round 2 for good."""
    root = tmp_path_factory.mktemp("crashes")
    outcome = run_crashes(root)
    assert not processes_under(root), "a process the crashes run started is still running"
    return outcome


@pytest.mark.integration
@pytest.mark.slow
def test_a_site_killed_after_round_1_and_restarted_finishes_the_run_with_its_ledger_continued(
    crashes: Outcome,
) -> None:
    """site-2 is SIGKILLed (with its SuperExec and app) after answering round 1, then restarted as it was.

    The run completes all rounds (round 2, with site-1 alone, short of
    min-replies, is its one failed round); site-2 keeps its node id (its
    registered key) and trains in round 3, and its privacy ledger continued:
    PROBE_STEPS per train message its two processes ran (read from their own
    output: a restarted site may also run the round-2 message the SuperLink
    kept for it), ``dp-steps-total`` never decreasing in metrics.jsonl, its
    last epsilon above its round-1 epsilon and equal to a fresh Opacus
    computation over its whole recorded history at the ledger's RDP order.
    """
    result, summary = crashes.result, crashes.summary()
    assert result.outcome.completed, crashes.federation.out.getvalue()
    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS
    assert summary["failed_rounds"] == [2]
    assert crashes.facts["node_id_after"] == crashes.facts["node_id_before"]
    rows = site_rows(result.run_dir, "site-2")
    assert [rows[r]["train_status"] for r in (1, 3)] == ["trained", "trained"], rows
    assert rows[2]["train_status"] in ("missing", "failed"), rows[2]
    ran = [span for span in spans(crashes.site("site-2")) if span.kind == "train" and span.sent_at is not None]
    epsilons, state = check_ledger_continued(result, "site-2", len(ran))
    assert summary["privacy"]["site-2"]["steps"] == state.total_steps
    assert not summary["ledger_regressions"]
    print(
        f"\nsite-2 back {crashes.events['site-2 back'] - crashes.events['site-2 crashed']:.0f} s after its crash "
        f"({crashes.facts['restart_attempts']} start attempts); {len(ran)} train messages run; "
        f"ledger {state.history}; epsilon {epsilons}; round seconds {[t.seconds for t in result.rounds]}"
    )


@pytest.mark.integration
@pytest.mark.slow
def test_a_site_gone_for_good_mid_round_costs_at_most_the_timeout_and_is_named(crashes: Outcome) -> None:
    """site-3 is SIGKILLed while it trains in round 2 and never returns.

    Each wait of each round ends within ROUND_TIMEOUT + SLACK (measured at
    site-1, there throughout, and by the server); the run completes with the
    others (site-1 and site-2 train round 3); metrics.jsonl names site-3 in
    every round after, with the reason, and the failed round 2 lists it
    among the unusable sites.
    """
    result, summary = crashes.result, crashes.summary()
    assert result.outcome.completed and summary["status"] == "completed"
    check_waits_are_bounded(result, crashes.site("site-1")[0])
    rows = site_rows(result.run_dir, "site-3")
    assert rows[1]["train_status"] == "trained"
    for number in range(2, ROUNDS + 1):
        assert rows[number]["train_status"] in ("missing", "failed") and rows[number]["train_reason"], rows[number]
    every = metric_rows(result.run_dir)
    assert {row["site"] for row in every if "site" in row} == {"site-1", "site-2", "site-3"}
    failed = [row for row in every if row.get("event") == "round-failed"]
    assert [row["round"] for row in failed] == [2] and "site-3" in failed[0]["unusable_sites"], failed
    last = {row["site"]: row["train_status"] for row in every if row.get("round") == ROUNDS and "site" in row}
    assert last["site-1"] == last["site-2"] == "trained"
    print(
        f"\nsite-3 {[(n, rows[n]['train_status'], rows[n]['train_reason']) for n in sorted(rows)]}; "
        f"site-1 waits {[(a, b, round(s)) for a, b, s in gaps(crashes.site('site-1')[0])]}"
    )


# ---- the network run: separate hosts in network namespaces, one site's link cut and restored ----


def start_in_namespaces(federation: LocalFederation, topology: Topology) -> None:
    """Start ``federation``'s SuperLink in the hub namespace at its veth address and each site in its namespace.

    Reuses the federation's files (``prepare``); the SuperLink certificate is
    issued again for the hub's address (the name the sites connect to), as
    ``fedcl pki init --hosts <address>`` does.
    """
    federation.prepare()
    address = topology.superlink_address
    federation.certs = init_pki(federation.coordinator / "certs", parse_hosts(address), force=True)
    port = free_port()
    federation.connection = Connection(SuperLinkAddress(address, port), federation.certs.ca_certificate, False)
    start_superlink(
        federation.group,
        federation.certs,
        address,
        port,
        federation.coordinator_home,
        log_path=federation.coordinator / "superlink.log",
        prefix=topology.prefix(topology.hub),
    )
    for name in federation.names:
        register_site(name, federation.keys[name].public_key, federation.connection, federation.coordinator_home)
        federation.start_supernode(name, topology.prefix(topology.site_namespace(name)))


def run_network(root: Path, topology: Topology) -> Outcome:
    """Run the network scenario over ``topology`` and return what it left; every process is stopped when it returns."""
    out = io.StringIO()
    with ProcessGroup() as group:
        federation = LocalFederation(plan(root, 2, min_replies=0), group, out)
        start_in_namespaces(federation, topology)
        run_id = federation.submit()
        sites = {process.name: process for process in group.processes if process.name in federation.names}
        events: dict[str, float] = {}
        facts: dict[str, object] = {
            "namespaces": {process.name: topology.namespace_of(process.pid) for process in group.processes},
            "certificate_names": certificate_names(federation.certs.server_certificate),
            "superlink": str(federation.connection.address),
            "node_id_before": node_id(sites["site-2"]),
        }
        wait_for_span(sites["site-2"], "train", 2, EVENT_TIMEOUT)  # round 2 reached site-2: it trains now
        topology.cut("site-2")
        events["cut"] = time.time()
        wait_for_span(sites["site-1"], "evaluate", 2, EVENT_TIMEOUT)  # the server stopped waiting for site-2
        events["server went on"] = time.time()
        topology.restore("site-2")
        events["restored"] = time.time()
        result = federation.wait(run_id)
        facts["node_id_after"] = node_id(sites["site-2"])
    return Outcome(federation, result, events, facts)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """2 sites in their own namespaces, the SuperLink in a third; site-2's link is cut in round 2, then restored.

    Skips, saying why, where namespaces cannot be made (not root, no ``ip``,
    refused by the kernel or a container's policy). The namespaces and links
    are deleted when the run ends, however it ends.
    """
    reason = why_unavailable()
    if reason:
        pytest.skip(f"separate hosts need network namespaces, and {reason}")
    root = tmp_path_factory.mktemp("network")
    topology = Topology(["site-1", "site-2"])
    try:
        topology.open()
        outcome = run_network(root, topology)
    finally:
        topology.close()
    assert not topology.leftovers(), f"namespaces or links left behind: {topology.leftovers()}"
    assert not processes_under(root), "a process the network run started is still running"
    return outcome


@pytest.mark.integration
@pytest.mark.slow
def test_sites_on_separate_hosts_reach_the_superlink_at_its_real_address(network: Outcome) -> None:
    """Each process ran in its own namespace; the sites reached the SuperLink at a veth address its certificate names."""
    namespaces = network.facts["namespaces"]
    assert namespaces["superlink"].endswith("-hub")
    assert namespaces["site-1"].endswith("-site-1") and namespaces["site-2"].endswith("-site-2")
    address = network.facts["superlink"].rsplit(":", 1)[0]
    assert address.startswith("10.213.") and address in network.facts["certificate_names"]
    for name in ("site-1", "site-2"):
        process = network.site(name)[0]
        assert f"--superlink {network.facts['superlink']}" in " ".join(process.popen.args)
    assert network.result.outcome.completed, network.federation.out.getvalue()


@pytest.mark.integration
@pytest.mark.slow
def test_a_site_whose_link_is_cut_mid_round_is_left_behind_within_the_timeout_and_rejoins_with_its_ledger(
    network: Outcome,
) -> None:
    """site-2's link goes down while it trains in round 2 and comes back once the server has given up on it.

    The server stops waiting for site-2 within ROUND_TIMEOUT + SLACK (round
    2, short of its reply, fails; the run goes on); round 3 waits for site-2,
    which is back with its node id and trains; its ledger counts every
    training it ran (the round-2 one whose reply was lost included: the site
    spent that privacy), PROBE_STEPS per train message it received, never
    going back, and its epsilon agrees with a fresh Opacus computation.
    """
    result, summary = network.result, network.summary()
    assert result.outcome.completed, network.federation.out.getvalue()
    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS
    assert summary["failed_rounds"] == [2]
    assert network.events["server went on"] - network.events["cut"] <= ROUND_TIMEOUT + SLACK
    check_waits_are_bounded(result, network.site("site-1")[0])
    rows = site_rows(result.run_dir, "site-2")
    assert [rows[r]["train_status"] for r in (1, 3)] == ["trained", "trained"], rows
    assert rows[2]["train_status"] in ("missing", "failed") and rows[2]["train_reason"], rows[2]
    assert {row["site"] for row in metric_rows(result.run_dir) if "site" in row} == {"site-1", "site-2"}
    assert network.facts["node_id_after"] == network.facts["node_id_before"]
    received = [span for span in spans(network.site("site-2")) if span.kind == "train"]
    epsilons, state = check_ledger_continued(result, "site-2", len(received))
    print(
        f"\nnetwork: events {[(k, round(v - network.events['cut'])) for k, v in network.events.items()]}; "
        f"site-2 {[(n, rows[n]['train_status'], rows[n].get('train_reason')) for n in sorted(rows)]}; "
        f"ledger {state.history}; epsilon {epsilons}; round seconds {[t.seconds for t in result.rounds]}"
    )


# ---- fast: no process started ----


def test_the_superlinks_node_unavailable_reply_is_counted_against_the_site_the_message_went_to(monkeypatch) -> None:
    """Flower's SuperLink answers for a node whose heartbeats stopped with an error reply from its own node id (1).

    Seen in the network run: before the fix that reply became a row for a
    site "node-1" and the lost site a second, "missing" row. Flower's grid
    gives each message its id (its object id) when it sends it, and the error
    reply names that id in ``reply_to_message_id``: that is how it is traced.
    """
    from fake_grid import ScriptedGrid, scripted_site
    from flwr.app import ArrayRecord, ConfigRecord, Message
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
    from flwr.supercore.task_identity import TaskIdentity

    from fedcl.run_config import parse_run_config
    from server.strategy_setup import build_strategy

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)

    def lost(message: Message) -> Message:  # the reply Flower's SuperLink makes for a node past its heartbeats
        return create_message_error_unavailable_res_message(message.metadata, "node_unavail")

    class SendingGrid(ScriptedGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            for message in messages:  # as flwr.superlink.grid.http_grid.push_messages does
                message.metadata.__dict__["_message_id"] = message.object_id
            return super().send_and_receive(messages, timeout=timeout)

    grid = SendingGrid({7: scripted_site("site-a", 0), 9: scripted_site("site-b", 1)})
    strategy = build_strategy(parse_run_config({"num-sites": 2, "recipe": "lora", "dp": False, "min-replies": 1}))
    strategy.poll_seconds = 0.02
    for number in (1, 2):
        if number == 2:
            grid.answers[9] = lost
        messages = list(strategy.configure_train(number, ArrayRecord(), ConfigRecord(), grid))
        strategy.aggregate_train(number, grid.send_and_receive(messages))
    replies = {reply.site: reply for reply in strategy.train_replies[2]}
    assert sorted(replies) == ["site-a", "site-b"]  # no "node-1", no second row for site-b
    assert replies["site-b"].status == "failed" and "Node Unavailable" in replies["site-b"].reason
    assert replies["site-b"].node == 9 and replies["site-a"].status == "trained"
