"""`flwr run .` end to end on a tiny config: the run directory is complete and its adapter reproduces the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from export_checks import assert_adapter_reproduces_summary

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_flwr_run_writes_a_complete_run_directory(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    # Two rounds: one private probe round (head on cached features), one private LoRA round.
    overrides = (
        f"model='{tiny_model_dir}' num-sites=2 probe-rounds=1 probe-steps=3 probe-batch-size=8 "
        f"num-rounds=1 local-steps=2 batch-size=8 max-length=32 "
        f"max-train-examples=24 max-test-examples=12 output-dir='{run_dir}'"
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
    assert sorted((r["round"], r["site"]) for r in rows) == [(1, "site-0"), (1, "site-1"), (2, "site-0"), (2, "site-1")]
    for row in rows:
        for key in ("accuracy", "train_examples", "bytes_up", "bytes_down", "epsilon"):
            assert row[key] is not None, key
        # under DP the noiseless training loss and the training time never leave the site
        assert row["train_loss"] is None and row["train_seconds"] is None
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("config", "accuracy", "per_site", "bytes", "wall_seconds"):
        assert key in summary
    for key in ("up_total", "down_total", "up_per_update_mean", "base_model_bytes"):
        assert summary["bytes"][key] > 0
    assert summary["bytes"]["up_per_update_mean"] < summary["bytes"]["base_model_bytes"]

    # The exported adapter, loaded the documented way (PEFT's own loader on the mean-pooled base), reproduces
    # the reported accuracy.
    from peft import PeftModel

    from fedcl.pooled_classifier import MeanPooledClassifier
    from fedcl.run_config import parse_run_config

    config = parse_run_config(summary["config"])
    assert config.pooling == "mean"
    description = json.loads((run_dir / "adapter" / "fedcl-model.json").read_text())
    assert description["num_labels"] == 5 and description["pooling"] == "mean"
    base = MeanPooledClassifier.from_base(str(tiny_model_dir), num_labels=5)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    assert_adapter_reproduces_summary(model, run_dir, summary)
    assert (run_dir / "checkpoint" / "global.npz").exists()
    for site, privacy in summary["privacy"].items():
        assert 0 < privacy["epsilon"] <= config.target_epsilon
        assert privacy["steps"] == 3 + 2 and privacy["accountant"] == "rdp-filter" and not privacy["stopped_for_budget"]
        assert (run_dir / "sites" / site / "privacy_ledger.json").exists()
        local = (run_dir / "sites" / site / "local_metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["round"] for line in local] == [1, 2]  # the loss stays in the site's own log
