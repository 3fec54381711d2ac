"""What travels between the server and a site: record names, round-config keys and reply keys.

Client and server both import this module (and nothing of each other). The
reply keys a site may send under DP are an explicit allow-list: each one is
either public (a function of the run config, the site's policy and its public
nominal size) or the output of a mechanism counted in the site's ledger.
README.md ("What leaves a site") explains each one.
"""

from __future__ import annotations

import re

import numpy as np
from flwr.app import Array, ArrayRecord

# --- records of a message --------------------------------------------------
SITE_RECORD = "site"  # ConfigRecord in every reply: site name, status, reason, label names
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
CLASS_SUMS = "class-sums"  # ncm release: noisy class sums of rows [a x, b] (strategies/ncm_sums.py)
NOISE_VARIANCE = "noise-variance"  # ncm release: per class, the noise variance added (sigma^2: public)
CONFIG_RECORD = "config"
# --- secure aggregation of the ncm release (fedcl/secure_ncm.py, README "Secure aggregation") ---
SECAGG_RECORD = "secagg"  # ConfigRecord: a stage's request (server) or answer (site) of fedcl/secure_aggregation.py
MASKED_SUMS = "masked-sums"  # ncm release under secure aggregation: int64 words, masked (the server sees only sums)
SECAGG_KEYS, SECAGG_SHARES, SECAGG_UNMASK = "secagg_keys", "secagg_shares", "secagg_unmask"  # ClientApp actions

# --- what the server sends with a round (everything else a site derives itself from the run config) ---
SERVER_ROUND = "server-round"
PHASE = "phase"  # informative: the site derives the phase itself and refuses a message that disagrees

# --- the site record of a reply ----------------------------------------------
SITE_NAME, STATUS, REASON = "site", "status", "reason"  # the label set is public, in the run config

# --- training-reply metrics a site may send under DP -------------------------
# public: the run plan, the site policy and its nominal size decide them
PUBLIC_TRAIN_METRICS = frozenset(
    {
        "num-examples",  # the site's public nominal record count (aggregation weight), not a count of its records
        "experience",  # the experience the site's schedule assigns to this round
        "train-steps",  # steps of the mechanism this round (from the plan)
        "ewc-importance-steps",  # steps of the importance estimate this round (from the plan)
        "delta",
        "noise-multiplier",
        "max-grad-norm",
        "sample-rate",  # the mechanism's settings
    }
)
# the ledger's own figures: a function of the mechanisms recorded (public settings), not of the records
LEDGER_TRAIN_METRICS = frozenset({"epsilon", "dp-steps-total", "stopped-for-budget", "target-epsilon"})
DP_TRAIN_METRICS = PUBLIC_TRAIN_METRICS | LEDGER_TRAIN_METRICS
# computed from private records without noise: only without DP (baselines), never under DP
PLAIN_ONLY_TRAIN_METRICS = frozenset({"train-loss", "train-seconds"})

# --- evaluation-reply metrics (on the site's test records; declared public in the README) ---
EVALUATION_METRICS = frozenset({"num-examples", "accuracy", "eval-loss", "experiences-seen"})
EXPERIENCE_COUNT = re.compile(r"exp-\d+-(correct|total)")  # per-experience counts of the accuracy matrix
PLAIN_ONLY_EVALUATION_METRICS = frozenset({"eval-seconds"})  # timing: only without DP


def allowed_train_metrics(dp: bool) -> frozenset[str]:
    """The metric keys a training reply may carry: the DP allow-list, or that plus the plain diagnostics."""
    return DP_TRAIN_METRICS if dp else DP_TRAIN_METRICS | PLAIN_ONLY_TRAIN_METRICS


def allowed_evaluation_metric(key: str, dp: bool) -> bool:
    """True if an evaluation reply may carry ``key`` (the fixed keys, the per-experience counts, and timing without DP)."""
    if key in EVALUATION_METRICS or EXPERIENCE_COUNT.fullmatch(key):
        return True
    return not dp and key in PLAIN_ONLY_EVALUATION_METRICS


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as a dict of numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A dict of numpy arrays as an ArrayRecord."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})
