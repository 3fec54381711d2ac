"""Helpers for tests that run a site's round directly: configs, the runtime, the policy, one round, a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.site_policy import SitePolicy, site_policy
from client.site_round import RoundResult, site_round
from client.site_state import open_state
from fedcl.model_factory import set_trainable_arrays

# What a DP training reply carries, written out by hand (the reference the tests hold the protocol's allow-list to).
TRAINING_REPLY_KEYS = frozenset(
    {
        "num-examples",
        "experience",
        "train-steps",
        "delta",
        "noise-multiplier",
        "max-grad-norm",
        "sample-rate",
        "epsilon",
        "dp-steps-total",
        "stopped-for-budget",
        "target-epsilon",
    }
)


def node_config(state_dir: Path, partition: int = 0, sites: int = 2, **policy: Any) -> dict[str, Any]:
    """A SuperNode's node config: its partition, its state directory and its privacy policy."""
    return {"partition-id": partition, "num-partitions": sites, "state-dir": str(state_dir), **policy}


_SITE_FILES: dict[tuple, tuple[Path, dict[str, Any]]] = {}


def virtual_site(flat: dict, site: int = 0) -> tuple[dict, dict[str, Any]]:
    """The run config with the federation's public keys, and virtual site ``site``'s node config (files written once).

    What the simulation launcher does for every virtual site
    (``simulations/site_files.py``), for tests that run a site in-process.
    """
    import tempfile

    from fedcl.run_config import parse_run_config
    from simulations.site_files import virtual_node_config, virtual_sites, write_site_files

    key = tuple(sorted((k, str(v)) for k, v in flat.items()))
    if key not in _SITE_FILES:
        sites = virtual_sites(parse_run_config(flat))
        root = Path(tempfile.mkdtemp(prefix="fedcl-site-data-"))
        write_site_files(sites, root)
        _SITE_FILES[key] = (root, sites.public)
    root, public = _SITE_FILES[key]
    return {**flat, **public}, virtual_node_config(root, site)


def site_context(flat: dict, state_dir: Path, partition: int = 0, node_id: int = 1, **policy: Any):
    """A Flower Context as virtual site ``partition`` sees it: the resolved run config, its files, state and policy."""
    from flwr.app import Context, RecordDict

    resolved, files = virtual_site(flat, partition)
    node = {**files, **node_config(state_dir, partition, int(flat.get("num-sites", 2)), **policy)}
    return Context(run_id=1, node_id=node_id, node_config=node, state=RecordDict(), run_config=resolved)


def runtime_of(flat: dict, site: int = 0):
    """The site's runtime with the seeded initial adapter installed (as the ClientApp does in round 1)."""
    from client.site_runtime import site_runtime

    resolved, node = virtual_site(flat, site)
    runtime = site_runtime(resolved, node, environ={})
    set_trainable_arrays(runtime.adapter.model, runtime.adapter.initial_state)
    return runtime


def policy_of(flat: dict, state_dir: Path, **keys: Any) -> SitePolicy:
    """The policy a site with node config ``keys`` (default: the run's own proposal) would read."""
    proposal = {
        "dp": flat.get("dp", True),
        "target-epsilon": flat.get("target-epsilon", 8.0),
        "delta": flat.get("delta", 1e-5),
    }
    return site_policy(node_config(state_dir, **{**proposal, **keys}), environ={})


def run_round(
    runtime,
    server_round: int,
    state_dir: Path,
    flat: dict | None = None,
    noise=None,
    round_config: dict | None = None,
    **policy: Any,
) -> RoundResult:
    """One training round as the ClientApp runs it, with the server's usual round config."""
    from client.continual import stream_context

    schedule = stream_context(runtime).schedule
    config = (
        round_config
        if round_config is not None
        else {"server-round": server_round, **schedule.round_config(server_round)}
    )
    flat = flat if flat is not None else runtime.config.to_flat()
    return site_round(runtime, policy_of(flat, state_dir, **policy), open_state(Path(state_dir)), config, noise=noise)


def forget_process_state() -> None:
    """What a restarted site process would not have: everything its worker cache holds."""
    from fedcl.worker_cache import WORKER_CACHE

    WORKER_CACHE.clear()


TOPIC_WORDS = ["market", "shares", "goal", "match", "vote", "party", "film", "music", "phone", "chip"]  # one token each


def write_topic_csv(path: Path, long_every: int = 0, long_words: int = 20) -> Path:
    """120 records over 5 topics (labels ``topic0``..``topic4``), 6 one-token words each; every ``long_every``-th
    record (0: none) has ``long_words`` words instead. Seeded: the same file every time."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = ["text,label"]
    for i in range(120):
        label = i % 5
        length = long_words if long_every and i % long_every == 0 else 6
        words = [TOPIC_WORDS[2 * label + int(rng.integers(2))] for _ in range(length)]
        lines.append(f"{' '.join(words)},topic{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
