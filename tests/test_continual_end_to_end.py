"""`python -m simulations.run` with a stream: replay + EWC under DP, a late site, the accuracy matrix in the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_a_private_stream_with_replay_ewc_and_a_late_site_runs_end_to_end(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = (
        f"model='{tiny_model_dir}' num-sites=2 stream='class-incremental' num-experiences=2 "
        "probe-rounds=1 probe-steps=3 probe-batch-size=8 num-rounds=0 max-length=32 max-train-examples=120 "
        "max-test-examples=20 replay-size=6 ewc-lambda=10.0 ewc-importance-batches=2 accountant='rdp' "
        f"site-offsets='0,1' output-dir='{run_dir}'"
    )
    done = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--run-config", overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sites = {(r["round"], r["site"]): r for r in rows if "site" in r}
    assert sorted(sites) == [(r, s) for r in (1, 2, 3) for s in ("site-0", "site-1")]
    assert sites[(1, "site-1")]["train_status"] == "skipped" and "not started" in sites[(1, "site-1")]["train_reason"]
    assert sites[(3, "site-0")]["train_status"] == "skipped" and "finished" in sites[(3, "site-0")]["train_reason"]
    assert sites[(2, "site-0")]["ewc_importance_steps"] == 2
    assert "replayed_examples" not in sites[(2, "site-0")]  # buffer sizes depend on the data: never sent under DP
    experiences = [r for r in rows if "site" not in r]
    assert [(r["experience"], len(r["accuracy"])) for r in experiences] == [(0, 1), (1, 2), (2, 3)]
    assert experiences[-1]["accuracy"][2] is None  # the run has two experiences; slot 2 is the late site's

    continual = json.loads((run_dir / "summary.json").read_text())["continual"]
    assert [len(row) for row in continual["accuracy_matrix"]] == [1, 2, 3]
    assert continual["bwt"] == pytest.approx(-continual["forgetting"])
    assert 0.0 <= continual["average_accuracy"] <= 1.0
    privacy = json.loads((run_dir / "summary.json").read_text())["privacy"]
    for site in ("site-0", "site-1"):
        assert 0 < privacy[site]["epsilon"] <= 8.0
        assert privacy[site]["steps"] == 3 + 2 + 3  # probe, EWC importance batches, probe
        for state in ("privacy_ledger.json", "replay_buffer.safetensors", "ewc_state.safetensors"):
            assert (run_dir / "sites" / site / state).exists()
