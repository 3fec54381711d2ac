"""SIMULATION-ONLY fault injector: one site sends a corrupted update, to test the robust aggregation.

Run-config ``attack`` = ``scale`` or ``sign-flip`` makes the site numbered
``attack-site`` replace its honest update Delta = trained - start (per
tensor) by ``attack-scale`` x Delta (scale) or -``attack-scale`` x Delta
(sign-flip) before encoding. It exists for benchmarks and tests
(simulations/bench_strategies.py); a real site never has a reason to set it,
and the default, ``attack = "none"``, leaves the reply untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedcl.run_config import RunConfig
from strategies.aggregation import Arrays


def inject_fault(trained: Arrays, start: Mapping[str, np.ndarray], config: RunConfig, site_index: int) -> Arrays:
    """``trained`` corrupted as the run config says when this is the attacking site; otherwise unchanged."""
    if config.attack == "none" or site_index != config.attack_site:
        return trained
    factor = config.attack_scale if config.attack == "scale" else -config.attack_scale
    return {name: (start[name] + factor * (value - start[name])).astype(np.float32) for name, value in trained.items()}
