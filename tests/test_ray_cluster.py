"""The Ray-cluster path: a Ray head started by the test (`ray start --head`), the simulation attached to it.

The head is started without the virtual sites' settings in its environment,
so its workers can learn them only through the job's runtime environment
(``simulations/run.py::ray_cluster_environment``): a run that completes shows
the path works end to end. The head is stopped (its processes killed) at the end.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from client.site_policy import SIMULATION_ENV
from simulations.run import free_local_port, ray_cluster_environment

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def stop_cluster(temp_dir: str) -> None:
    """Kill every process of the Ray cluster whose temp dir is ``temp_dir`` (never another Ray on the machine)."""
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info.get("cmdline") or []):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture()
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="fr-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_local_port()
    env = {k: v for k, v in os.environ.items() if k != SIMULATION_ENV and not k.startswith("RAY_")}
    started = subprocess.run(
        [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        stop_cluster(temp_dir)
        time.sleep(1)


def test_the_address_is_checked_and_the_sites_settings_ride_in_the_jobs_runtime_env():
    env = ray_cluster_environment("10.0.0.5:6379", {SIMULATION_ENV: '{"state-root": "/x"}'})
    assert env["RAY_ADDRESS"] == "10.0.0.5:6379"
    job = json.loads(env["RAY_JOB_CONFIG_JSON_ENV_VAR"])
    assert job == {"runtime_env": {"env_vars": {SIMULATION_ENV: '{"state-root": "/x"}'}}}
    with pytest.raises(ValueError, match="host:port"):
        ray_cluster_environment("10.0.0.5", {})


@pytest.mark.integration
def test_a_simulation_runs_on_a_ray_cluster_started_apart(ray_head, tiny_model_dir, tmp_path):
    address, temp_dir = ray_head
    run_dir = tmp_path / "run"
    overrides = (
        f"model='{tiny_model_dir}' num-sites=3 probe-rounds=1 probe-steps=2 probe-batch-size=8 num-rounds=0 "
        f"max-length=32 max-train-examples=24 max-test-examples=12 output-dir='{run_dir}'"
    )
    done = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--run-config", overrides, "--ray-address", address,
         "--cpus-per-site", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sessions = list(Path(temp_dir).glob("session_2*"))
    assert len(sessions) == 1 and list(sessions[0].glob("logs/python-core-driver-*"))  # the run joined this cluster
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and sorted(summary["per_site"]) == ["site-0", "site-1", "site-2"]
    for site in ("site-0", "site-1", "site-2"):  # the sites found their settings: state where the launcher said
        assert (run_dir / "sites" / site / "privacy_ledger.json").exists()
    workers = list(sessions[0].glob("logs/worker-*.out"))
    assert any("ClientAppActor" in w.read_text(errors="replace") for w in workers)  # the cluster's own workers
