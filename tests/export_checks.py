"""Check that an exported adapter, loaded by the caller, gives the per-site accuracies its run reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest


def assert_adapter_reproduces_summary(model: Any, run_dir: Path, summary: dict[str, Any]) -> None:
    """Re-split the run's data, evaluate ``model`` on every site's test split, compare with ``summary``."""
    from transformers import AutoTokenizer

    from client.local_training import encode, evaluate
    from fedcl.run_config import parse_run_config
    from simulations.data_sources import load_dataset
    from simulations.scenarios import split_sites

    config = parse_run_config(summary["config"])
    data = load_dataset(config)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "adapter"))
    accuracies = []
    for site in split_sites(data.labels, data.groups, config):
        test = encode(tokenizer, [data.texts[i] for i in site.test], data.labels[site.test], config.max_length)
        accuracy = evaluate(model, test, batch_size=64).accuracy
        assert accuracy == pytest.approx(summary["per_site"][site.name]["accuracy"], abs=1e-9)
        accuracies.append(accuracy)
    assert float(np.mean(accuracies)) == pytest.approx(summary["accuracy"], abs=1e-9)
