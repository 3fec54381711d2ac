"""`flwr run .` end to end on a tiny config: the run directory is complete and its adapter reproduces the report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_flwr_run_writes_a_complete_run_directory(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    # Two rounds: one private probe round (head on cached features), one private LoRA round.
    overrides = (f"model='{tiny_model_dir}' num-sites=2 probe-rounds=1 probe-steps=3 probe-batch-size=8 "
                 f"num-rounds=1 local-steps=2 batch-size=8 max-length=32 "
                 f"max-train-examples=24 max-test-examples=12 output-dir='{run_dir}'")
    done = subprocess.run([sys.executable, "-m", "simulations.run", "--run-config", overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["site"]) for r in rows) == [(1, "site-0"), (1, "site-1"), (2, "site-0"), (2, "site-1")]
    for row in rows:
        for key in ("accuracy", "train_examples", "bytes_up", "bytes_down", "train_seconds", "epsilon"):
            assert row[key] is not None, key
        assert row["train_loss"] is None  # under DP the noiseless training loss never leaves the site
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("config", "accuracy", "per_site", "bytes", "wall_seconds"):
        assert key in summary
    for key in ("up_total", "down_total", "up_per_update_mean", "base_model_bytes"):
        assert summary["bytes"][key] > 0
    assert summary["bytes"]["up_per_update_mean"] < summary["bytes"]["base_model_bytes"]

    # The exported adapter, loaded the documented way, reproduces the reported accuracy.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from client.local_training import encode, evaluate
    from fedcl.run_config import parse_run_config
    from simulations.data_sources import load_dataset
    from simulations.scenarios import split_sites

    config = parse_run_config(summary["config"])
    data = load_dataset(config)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=len(data.label_names))
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "adapter"))
    accuracies = []
    for site in split_sites(data.labels, data.groups, config):
        test = encode(tokenizer, [data.texts[i] for i in site.test], data.labels[site.test], config.max_length)
        accuracy = evaluate(model, test, batch_size=64).accuracy
        assert accuracy == pytest.approx(summary["per_site"][site.name]["accuracy"], abs=1e-9)
        accuracies.append(accuracy)
    assert float(np.mean(accuracies)) == pytest.approx(summary["accuracy"], abs=1e-9)
    assert (run_dir / "checkpoint" / "global.npz").exists()
    for site, privacy in summary["privacy"].items():
        assert 0 < privacy["epsilon"] <= config.target_epsilon
        assert privacy["steps"] == 3 + 2 and privacy["accountant"] == "prv" and not privacy["stopped_for_budget"]
        assert (run_dir / "sites" / site / "privacy_ledger.json").exists()
        local = (run_dir / "sites" / site / "local_metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["round"] for line in local] == [1, 2]  # the loss stays in the site's own log
