"""The server resumes a run from its checkpoint: every piece of state round-trips, a changed config is refused,
metrics.jsonl is appended to, and an interrupted-then-resumed run ends where an uninterrupted one ends.

The reference for a resumed run is the same run without interruption (same
scripted sites, same aggregation); the integration test does the same through
the real simulation launcher, killing its whole process tree after round 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from fake_grid import ScriptedGrid, scripted_site
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

import server.app as server_app
from fedcl.run_config import ConfigError, parse_run_config
from server.checkpoint import (
    CHECKPOINT_DIR,
    GLOBAL_FILE,
    RESUME_FILE,
    Checkpoint,
    load_checkpoint,
    open_resume,
    save_checkpoint,
    training_config,
)
from server.privacy_report import PrivacyWatch
from server.round_guard import RoundGuard
from server.run_report import rows_in_force
from server.strategy_setup import STATE_FILE, build_strategy
from strategies.aggregation import SiteUpdate
from strategies.site_strategy import SiteReply

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages need a run and node identity, which Flower sets in its own processes."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture
def no_export(monkeypatch):
    """The scripted sites' arrays are not an adapter: record the export instead of loading a model for it."""
    exported: list[dict] = []

    def fake_export(folder, config, arrays, label_names):
        exported.append({k: v.copy() for k, v in arrays.items()})
        return 1

    monkeypatch.setattr(server_app, "export_adapter", fake_export)
    return exported


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the server catches it."""


def run_flat(run_dir: Path, **keys) -> dict:
    return {
        "recipe": "lora",
        "num-rounds": 4,
        "num-sites": 2,
        "dp": False,
        "server-optimizer": "adam",  # moments the checkpoint must carry
        "robust": "none",
        "output-dir": str(run_dir),
        **keys,
    }


def sites(nodes: tuple[int, int], seen: dict[str, list[int]] | None = None) -> ScriptedGrid:
    seen = seen if seen is not None else {}
    return ScriptedGrid(
        {
            nodes[0]: scripted_site("site-0", 0, seen=seen.setdefault("site-0", [])),
            nodes[1]: scripted_site("site-1", 1, seen=seen.setdefault("site-1", [])),
        }
    )


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- every piece of state round-trips ---------------------------------------------------------------------


def test_checkpoint_round_trip_of_every_piece_of_state(tmp_path):
    config = parse_run_config(run_flat(tmp_path / "run"))
    strategy = build_strategy(config)
    grid = sites((1, 2))
    for server_round in (1, 2):  # two rounds: the adam moments exist and the sites are bound
        messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    guard = RoundGuard(3)
    guard.record(1, None, updated=True)
    guard.record(2, "1 of 2 required training replies", updated=False)
    watch = PrivacyWatch(dp=True, target_epsilon=8.0)
    ledger = {"epsilon": 1.5, "dp-steps-total": 40, "delta": 1e-5, "noise-multiplier": 1.1, "sample-rate": 0.1}
    watch.observe(1, [SiteReply("site-0", "trained", metrics=dict(ledger))])
    watch.observe(2, [SiteReply("site-0", "trained", metrics={**ledger, "dp-steps-total": 20})])  # a regression
    server = server_app.server_state(strategy, guard, watch, None)
    run_dir = tmp_path / "run"
    state = strategy.aggregator.state_dict()
    save_checkpoint(
        run_dir,
        Checkpoint(2, 4, strategy.current, state, server=server, config=training_config(config)),
    )

    loaded = load_checkpoint(run_dir)
    assert (loaded.round, loaded.total_rounds) == (2, 4)
    assert sorted(loaded.arrays) == ["w"] and np.array_equal(loaded.arrays["w"], strategy.current["w"])
    assert sorted(loaded.strategy_state) == sorted(state) and any(k.startswith("m/") for k in state)
    assert all(np.array_equal(loaded.strategy_state[k], state[k]) for k in state)
    assert np.array_equal(np.load(run_dir / CHECKPOINT_DIR / GLOBAL_FILE)["w"], strategy.current["w"])
    assert sorted(np.load(run_dir / CHECKPOINT_DIR / STATE_FILE).files) == sorted(state)

    fresh, fresh_guard, fresh_watch = build_strategy(config), RoundGuard(3), PrivacyWatch(dp=True, target_epsilon=8.0)
    server_app.restore_server(loaded, fresh, fresh_guard, fresh_watch, None)
    assert fresh.identities.sites == {1: "site-0", 2: "site-1"}
    assert fresh_guard.state() == guard.state() and fresh_guard.streak == 1
    assert fresh_watch.state() == watch.state() and fresh_watch.regressions[0]["steps_before"] == 40
    assert fresh_watch.summary() == watch.summary()

    # The restored aggregator takes the same next step as the one that never stopped (the reference).
    rng = np.random.default_rng(0)
    updates = [SiteUpdate(f"site-{i}", {"w": rng.standard_normal(4).astype(np.float32)}, 10) for i in range(2)]
    expected = strategy.aggregator.aggregate(strategy.current, updates)
    got = fresh.aggregator.aggregate(loaded.arrays, updates)
    np.testing.assert_array_equal(got["w"], expected["w"])


def test_the_continual_accuracy_counts_round_trip(tmp_path):
    from server.continual_run import ContinualRun

    config = parse_run_config(
        {
            "stream": "class-incremental",
            "num-experiences": 2,
            "probe-rounds": 1,
            "num-rounds": 0,
            "num-sites": 2,
            "labels": "business,entertainment,politics,sport,tech",
        }
    )
    run = ContinualRun(config, tmp_path)
    run.on_round_end(1, [SiteReply("site-0", "evaluated", metrics={"exp-0-correct": 8, "exp-0-total": 10})])
    restored = ContinualRun(config, tmp_path)
    restored.restore(json.loads(json.dumps(run.state())))
    assert restored.summary() == run.summary()
    second = {"exp-0-correct": 4, "exp-0-total": 10, "exp-1-correct": 9, "exp-1-total": 10}
    for each in (run, restored):
        each.on_round_end(2, [SiteReply("site-0", "evaluated", metrics=second)])
    assert restored.summary() == run.summary() and restored.summary()["accuracy_matrix"] == [[0.8], [0.4, 0.9]]
    with pytest.raises(ValueError, match="slots"):
        restored.restore({"correct": [[1]] * 5, "total": [[1]] * 5})


# --- what a resume accepts ---------------------------------------------------------------------------------


def test_a_resume_with_other_training_settings_is_refused_naming_the_keys(tmp_path):
    run_dir = tmp_path / "run"
    config = parse_run_config(run_flat(run_dir))
    save_checkpoint(run_dir, Checkpoint(1, 4, {"w": np.zeros(4, np.float32)}, {}, config=training_config(config)))
    changed = parse_run_config(run_flat(run_dir, **{"learning-rate": 0.5, "num-rounds": 6, "resume": str(run_dir)}))
    with pytest.raises(ConfigError) as err:
        open_resume(changed, run_dir)
    message = str(err.value)
    assert "learning-rate (checkpoint 0.01, now 0.5)" in message and "num-rounds (checkpoint 4, now 6)" in message
    assert "\n" not in message and "seed" not in message
    patient = run_flat(run_dir, **{"round-timeout": 60.0, "min-replies": 1, "max-failed-rounds": 9})
    assert open_resume(parse_run_config({**patient, "resume": str(run_dir)}), run_dir).round == 1  # operational keys
    with pytest.raises(ConfigError, match="no checkpoint"):
        open_resume(changed, tmp_path / "elsewhere")


def test_a_resume_into_another_output_dir_is_refused(tmp_path):
    config = parse_run_config(run_flat(tmp_path / "other", resume=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="its own run directory"):
        server_app.resolve_run_dir(config)


# --- an interrupted run, resumed ---------------------------------------------------------------------------


def test_an_interrupted_run_resumes_appends_and_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, no_export):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    server_app.run_federation(sites((1, 2)), parse_run_config(run_flat(reference_dir)))
    reference = np.load(reference_dir / CHECKPOINT_DIR / GLOBAL_FILE)["w"]

    # Killed after round 3's rows reached metrics.jsonl but before its checkpoint: the checkpoint says round 2.
    real_save = server_app.save_checkpoint

    def save_then_die(folder, checkpoint):
        if checkpoint.round == 3:
            raise Killed()
        return real_save(folder, checkpoint)

    monkeypatch.setattr(server_app, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        server_app.run_federation(sites((1, 2)), parse_run_config(run_flat(run_dir)))
    monkeypatch.setattr(server_app, "save_checkpoint", real_save)
    before = (run_dir / "metrics.jsonl").read_bytes()
    assert load_checkpoint(run_dir).round == 2 and {r["round"] for r in read_rows(run_dir)} == {1, 2, 3}
    shutil.copytree(run_dir, tmp_path / "copy")

    # Resume: a new session, new node ids (the sites re-bind), the same config plus resume.
    seen: dict[str, list[int]] = {}
    resumed = parse_run_config(run_flat(run_dir, resume=str(run_dir)))
    server_app.run_federation(sites((21, 22), seen), resumed)

    assert seen == {"site-0": [3, 4], "site-1": [3, 4]}  # the sites see the true server rounds
    after = (run_dir / "metrics.jsonl").read_bytes()
    assert after.startswith(before)  # appended, never truncated
    rows = read_rows(run_dir)
    assert {"event": "resume", "round": 2, "continues_at": 3} in rows
    in_force = [(r["round"], r["site"]) for r in rows_in_force(rows) if "site" in r]
    assert sorted(in_force) == [(r, s) for r in (1, 2, 3, 4) for s in ("site-0", "site-1")]  # round 3 once
    final = load_checkpoint(run_dir)
    assert final.round == 4 and final.server["identities"]["sites"] == {"21": "site-0", "22": "site-1"}
    np.testing.assert_array_equal(final.arrays["w"], reference)  # the same arithmetic in the same order: exact
    np.testing.assert_array_equal(no_export[-1]["w"], reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_round"] == 2
    assert summary["rounds_completed"] == 4 and sorted(summary["per_site"]) == ["site-0", "site-1"]
    assert summary["bytes"]["up_total"] == json.loads((reference_dir / "summary.json").read_text())["bytes"]["up_total"]

    # The test has power: the same resume without the optimizer's moments ends elsewhere.
    monkeypatch.setattr(server_app, "restore_strategy_state", lambda strategy, state: None)
    server_app.run_federation(
        sites((31, 32)), parse_run_config(run_flat(tmp_path / "copy", resume=str(tmp_path / "copy")))
    )
    assert not np.allclose(np.load(tmp_path / "copy" / CHECKPOINT_DIR / GLOBAL_FILE)["w"], reference)

    # A resume of the finished run says so and does nothing.
    exports = len(no_export)
    server_app.run_federation(sites((41, 42)), resumed)
    assert (run_dir / "metrics.jsonl").read_bytes() == after and len(no_export) == exports


# --- through the real launcher ------------------------------------------------------------------------------


def launcher(overrides: str, log: Path, tmp: Path) -> subprocess.Popen:
    """`python -m simulations.run` in its own process group (Flower, Ray and their children inherit it)."""
    env = {**os.environ, "TMPDIR": str(tmp)}  # the launcher's FLWR_HOME and Ray's folders land under tmp
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.run", "--run-config", overrides],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_tree(proc: subprocess.Popen, tmp: Path) -> None:
    """SIGKILL the launcher's process group, then anything left that was started under ``tmp`` (the detached SuperLink)."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for _ in range(3):  # Ray's daemons re-parent to init and may still be starting others: a few passes
        left = []
        for other in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
            cmdline = " ".join(other.info.get("cmdline") or [])
            environ = other.info.get("environ") or {}
            if other.info.get("status") == psutil.STATUS_ZOMBIE or other.pid == os.getpid():
                continue
            if str(tmp) in cmdline or any(str(tmp) in value for value in environ.values()):
                left.append(other)
        for other in left:
            try:
                other.kill()
            except psutil.NoSuchProcess:
                pass
        if not left:
            return
        time.sleep(1)


@pytest.mark.integration
def test_a_simulation_killed_after_round_1_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    """Kill the launcher's whole process tree once round 1 is in metrics.jsonl, resume, compare with a full run.

    ``dp = false``: under DP a site draws its noise from the OS CSPRNG (never
    seeded in a deployment), so two uninterrupted runs already differ; without
    DP every site's randomness is seeded by the run seed, the server round and
    the site, so the resumed run must reproduce the uninterrupted one. Its
    tolerance, 1e-5 absolute, covers float32 summation order only (sites
    restart in fresh processes, a model reloaded from disk): any lost or
    repeated round, or a lost optimiser moment, moves the arrays by ~1e-2.
    """
    config = (
        f"model='{tiny_model_dir}' recipe='probe-then-lora' probe-rounds=3 num-rounds=0 probe-steps=5 max-length=32 "
        "max-train-examples=40 max-test-examples=20 num-sites=2 dp=false server-optimizer='adam'"
    )
    full_dir, run_dir = tmp_path / "full", tmp_path / "run"
    tmp = Path(tempfile.mkdtemp(prefix="fcl-"))  # short: Ray's socket paths under it must fit in 107 bytes
    done = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--run-config", f"{config} output-dir='{full_dir}'"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    proc = launcher(f"{config} output-dir='{run_dir}'", tmp_path / "first.log", tmp)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            metrics, saved = run_dir / "metrics.jsonl", run_dir / CHECKPOINT_DIR / RESUME_FILE
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if saved.exists() and any(line.startswith("{") and '"round": 1,' in line for line in lines):
                break  # round 1's rows and its checkpoint are written (the rows come first)
            time.sleep(0.2)
    finally:
        kill_tree(proc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert (run_dir / CHECKPOINT_DIR / RESUME_FILE).exists(), (tmp_path / "first.log").read_text()[-3000:]
    interrupted = load_checkpoint(run_dir).round
    assert 1 <= interrupted < 3 and not (run_dir / "summary.json").exists()
    before = (run_dir / "metrics.jsonl").read_bytes()

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.run",
            "--run-config",
            f"{config} resume='{run_dir}'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_bytes().startswith(before)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_round"] == interrupted
    rows = rows_in_force(read_rows(run_dir))
    assert sorted((r["round"], r["site"]) for r in rows if "site" in r) == [
        (r, s) for r in (1, 2, 3) for s in ("site-0", "site-1")
    ]
    full = np.load(full_dir / CHECKPOINT_DIR / GLOBAL_FILE)
    mine = np.load(run_dir / CHECKPOINT_DIR / GLOBAL_FILE)
    assert sorted(full.files) == sorted(mine.files)
    for name in full.files:
        np.testing.assert_allclose(mine[name], full[name], rtol=0, atol=1e-5, err_msg=name)
