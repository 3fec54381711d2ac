"""Secure aggregation in the deployment path: a TLS pilot of 3 authenticated sites releases its ncm class sums securely.

Real processes, as `fedcl poc` runs them (``fedcl.pilot.poc.LocalFederation``): a TLS SuperLink with SuperNode
authentication and three sites, each with its own CSV, state folder and a fresh ClientApp process per message. The run
is the ncm recipe with ``secure-aggregation = true`` (``secagg-min-honest`` = every site): the key, share, masked-input
and unmask stages travel as Flower messages over gRPC with TLS, and the sites keep their protocol state on disk
between messages.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pilot_data import LABELS, write_site_csvs

from client.privacy_ledger import PrivacyLedger
from client.site_state import SiteState
from fedcl.pilot.poc import LocalFederation, PocPlan
from fedcl.pilot.processes import ProcessGroup


def run_pilot(tmp_path: Path, run_config: str):
    """A TLS pilot of 3 authenticated sites of 40 records each runs ``run_config``; (its result, its progress text)."""
    data = write_site_csvs(tmp_path / "data", sites=3, per_site=40)
    out = io.StringIO()
    plan = PocPlan(
        sites=3,
        data=data,
        workdir=tmp_path / "pilot",
        run_config=f"{run_config} max-length=32 secure-aggregation=true labels='{','.join(LABELS)}'",
        timeout=300,
    )
    with ProcessGroup() as group:
        federation = LocalFederation(plan, group, out)
        federation.start()
        result = federation.wait(federation.submit())
    assert result.outcome.completed, out.getvalue()
    return result, out.getvalue()


@pytest.mark.integration
@pytest.mark.slow
def test_three_authenticated_sites_release_their_class_sums_through_secure_aggregation_over_tls(
    tmp_path: Path,
) -> None:
    result, progress = run_pilot(tmp_path, "recipe='ncm'")
    assert "TLS, SuperNode authentication" in progress
    log = "\n".join(line for _, line in result.outcome.log)
    assert "secure aggregation: 3 sites shared keys" in log
    assert "secure aggregation: the sum of 3 sites unmasked" in log
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    sites = [row for row in rows if "site" in row]
    assert {row["train_status"] for row in sites} == {"trained"} and len(sites) == 3
    assert all(row["train_examples"] is None for row in sites)  # no per-site size beside a secure sum
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["accuracy"] > 1.0 / len(LABELS)  # the unmasked sum classifies better than chance
    for name, state in result.state_dirs.items():
        ledger = PrivacyLedger.load(SiteState(state).ledger)
        assert ledger.total_steps == 1, name  # one release, recorded by the site itself
        assert not list((state / "secagg").glob("*.state")), name  # the round's secrets are gone after the unmask
    assert not list(result.run_dir.rglob("privacy_ledger.json")), "a ledger was written on the coordinator's side"


@pytest.mark.integration
@pytest.mark.slow
def test_three_authenticated_sites_mask_their_lora_updates_over_tls(tmp_path: Path) -> None:
    """A DP-SGD (LoRA) round under secure aggregation in deployment: the server starts from the seeded adapter.

    One round keeps the suite short: a probe round masks its update through the same code (``client/secure_update.py``).
    """
    result, _ = run_pilot(tmp_path, "recipe='lora' num-rounds=1 local-steps=2 batch-size=8")
    log = "\n".join(line for _, line in result.outcome.log)
    assert log.count("secure aggregation: the sum of 3 sites unmasked") == 1
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    sites = [row for row in rows if "site" in row]
    assert {row["train_status"] for row in sites} == {"trained"} and len(sites) == 3
    assert all(row["train_examples"] is None for row in sites)  # no per-site size beside a secure sum
    for name, state in result.state_dirs.items():
        ledger = PrivacyLedger.load(SiteState(state).ledger)
        assert ledger.total_steps == 2, name  # the round's DP-SGD steps at the site's own noise
        assert not list((state / "secagg").glob("*.state")), name
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").exists()  # the moved global adapter, exported
