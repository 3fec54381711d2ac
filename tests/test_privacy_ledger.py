"""The privacy ledger: accounting from the whole history, durable atomic files, budget checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.privacy_ledger import (
    FILTER_ORDERS,
    BudgetError,
    LedgerError,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    require_budget_for_one_round,
    validate_budget,
    validate_clip,
)
from fedcl.run_config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SIGMA, RATE = 1.1, 0.05  # a typical DP-SGD step: noise multiplier ~1, batch 32 of ~600 records


def fresh_rdp_epsilon(history: list, delta: float = 1e-5, orders: tuple | list = FILTER_ORDERS) -> float:
    """Opacus' own RDP accountant, fed step by step, converted at the best of ``orders``."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for sigma, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return float(accountant.get_privacy_spent(delta=delta, alphas=list(orders))[0])


def _saved_ledger(tmp_path: Path) -> Path:
    ledger = PrivacyLedger(target_epsilon=8.0, delta=1e-5)
    ledger.record(SIGMA, RATE, 20)
    ledger.record(SIGMA, 0.04, 10)
    path = tmp_path / "state" / "privacy_ledger.json"
    ledger.save(path)
    return path


def _edited(raw: bytes) -> bytes:
    document = json.loads(raw)
    document["payload"]["accountant"]["history"][0][2] = 2
    return json.dumps(document).encode()


def test_round_trip_keeps_history_budget_and_epsilon(tmp_path: Path) -> None:
    path = _saved_ledger(tmp_path)
    loaded = PrivacyLedger.load(path)
    assert loaded.history == [(SIGMA, RATE, 20), (SIGMA, 0.04, 10)]
    assert (loaded.target_epsilon, loaded.delta, loaded.filter_order) == (8.0, 1e-5, None)
    assert loaded.total_steps == 30
    assert loaded.epsilon() == pytest.approx(fresh_rdp_epsilon(loaded.history), rel=1e-9)  # best order until committed
    loaded.commit_order(8.0)
    loaded.commit_order(2.0)  # a committed order never changes
    loaded.save(path)
    again = PrivacyLedger.load(path)
    assert again.filter_order == 8.0
    assert again.epsilon() == pytest.approx(fresh_rdp_epsilon(again.history, orders=[8.0]), rel=1e-9)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_record_merges_like_opacus_and_zero_steps_record_nothing() -> None:
    ledger = PrivacyLedger(target_epsilon=8.0, delta=1e-5)
    ledger.record(SIGMA, RATE, 5)
    ledger.record(SIGMA, RATE, 7)
    ledger.record(SIGMA, RATE, 0)
    assert ledger.history == [(SIGMA, RATE, 12)]


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # truncated write
        lambda raw: b"",  # empty file
        lambda raw: b"\x00\xff garbage",  # not text
        lambda raw: _edited(raw),  # fewer steps in the history: valid JSON, wrong checksum
    ],
    ids=["truncated", "empty", "garbage", "edited"],
)
def test_damaged_file_raises_ledger_error(tmp_path: Path, damage) -> None:
    path = _saved_ledger(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(LedgerError, match="restore the site's state directory"):
        PrivacyLedger.load(path)


def test_foreign_or_future_file_raises(tmp_path: Path) -> None:
    path = _saved_ledger(tmp_path)
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "version": 99}))
    with pytest.raises(LedgerError, match="version 99"):
        PrivacyLedger.load(path)
    path.write_text(json.dumps({"history": []}))
    with pytest.raises(LedgerError, match="not a fedcl privacy ledger"):
        PrivacyLedger.load(path)


def test_mismatched_budget_raises(tmp_path: Path) -> None:
    path = _saved_ledger(tmp_path)
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger.load(path, delta=1e-6)
    with pytest.raises(LedgerError, match="target_epsilon"):
        PrivacyLedger.load(path, target_epsilon=3.0)
    assert issubclass(LedgerError, ValueError)


def test_missing_file_is_fresh_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.json"
    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger.load(path)
    fresh = PrivacyLedger(target_epsilon=3.0, delta=1e-5)
    assert fresh.history == [] and fresh.epsilon() == 0.0
    assert not path.exists()  # creating is not saving


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved_ledger(tmp_path)
    before = path.read_bytes()
    ledger = PrivacyLedger.load(path)
    ledger.record(SIGMA, RATE, 100)

    def crash(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ledger.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_epsilon_continues_across_a_restart(tmp_path: Path) -> None:
    """k steps, save, a new process loads and adds m steps: epsilon equals the full history's (1%)."""
    k, m = 30, 20
    path = tmp_path / "privacy_ledger.json"
    first = PrivacyLedger(target_epsilon=8.0, delta=1e-5)
    first.record(SIGMA, RATE, k)
    first.save(path)
    before = first.epsilon()
    script = (
        "import sys; from client.privacy_ledger import PrivacyLedger as L\n"
        "ledger = L.load(sys.argv[1], target_epsilon=8.0, delta=1e-5)\n"
        f"ledger.record({SIGMA}, {RATE}, {m}); ledger.save(sys.argv[1]); print(ledger.epsilon())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    after = float(done.stdout.strip().splitlines()[-1])
    fresh = fresh_rdp_epsilon([(SIGMA, RATE, k + m)])
    assert after > before
    assert after == pytest.approx(fresh, rel=1e-9)
    assert PrivacyLedger.load(path).epsilon() == pytest.approx(fresh, rel=1e-9)


def test_epsilon_if_prices_without_recording() -> None:
    ledger = PrivacyLedger(target_epsilon=8.0, delta=1e-5)
    ledger.record(SIGMA, RATE, 40)
    spent, planned = ledger.epsilon(), ledger.epsilon_if([(SIGMA, RATE, 40)])
    assert ledger.history == [(SIGMA, RATE, 40)]
    ledger.record(SIGMA, RATE, 40)
    assert planned > spent
    assert ledger.epsilon() == pytest.approx(planned)


def test_hard_stop_keeps_every_site_within_a_small_budget() -> None:
    """Sites train round after round while the next round is affordable; none ends above its target."""
    for rate in (0.02, 0.05, 0.2):
        ledger = PrivacyLedger(target_epsilon=1.0, delta=1e-5)
        ledger.commit_order(32.0)
        rounds = 0
        while ledger.can_afford([(SIGMA, rate, 10)]):
            ledger.record(SIGMA, rate, 10)
            rounds += 1
        assert rounds < 100
        assert ledger.epsilon() <= ledger.target_epsilon
        assert ledger.epsilon_if([(SIGMA, rate, 10)]) > ledger.target_epsilon
        assert fresh_rdp_epsilon(ledger.history, orders=[32.0]) <= 1.0  # the filter's figure is Opacus' own


def test_calibration_meets_the_target_tightly() -> None:
    sigma = calibrate_noise_multiplier(8.0, 1e-5, RATE, 200)
    spent = compute_epsilon([(sigma, RATE, 200)], 1e-5, "prv")
    assert 7.8 <= spent <= 8.0


def test_budget_that_cannot_cover_one_round_names_the_smallest_workable_setting() -> None:
    with pytest.raises(BudgetError, match=r"target-epsilon >= ([0-9.]+)") as caught:
        require_budget_for_one_round(0.05, 1e-5, 0.5, 40, accountant="rdp")
    smallest = float(caught.value.args[0].split("target-epsilon >= ")[1].split(",")[0].split(" ")[0])
    require_budget_for_one_round(smallest, 1e-5, 0.5, 40, accountant="rdp")  # the named setting works
    assert "lower the sample rate" in str(caught.value)  # not even one step fits this budget
    assert isinstance(caught.value, ValueError)
    with pytest.raises(BudgetError, match=r"cut local-steps to (\d+)") as caught:
        require_budget_for_one_round(0.3, 1e-5, 0.5, 40, accountant="rdp")
    steps = int(caught.value.args[0].split("cut local-steps to ")[1].split(" ")[0].rstrip(","))
    assert 1 <= steps < 40
    require_budget_for_one_round(0.3, 1e-5, 0.5, steps, accountant="rdp")  # that many steps fit
    with pytest.raises(BudgetError):
        require_budget_for_one_round(0.3, 1e-5, 0.5, steps + 1, accountant="rdp")  # and no more
    require_budget_for_one_round(8.0, 1e-5, 0.05, 10, accountant="rdp")  # a normal budget passes


def test_special_histories() -> None:
    assert compute_epsilon([], 1e-5) == 0.0
    assert compute_epsilon([(0.0, RATE, 1)], 1e-5) == math.inf  # a step without noise has no finite epsilon


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (lambda: validate_budget(0.0, 1e-5), "target-epsilon"),
        (lambda: validate_budget(-1.0, 1e-5), "target-epsilon"),
        (lambda: validate_budget(math.inf, 1e-5), "target-epsilon"),
        (lambda: validate_budget(8.0, 1.0), "delta"),
        (lambda: validate_budget(8.0, 0.0), "delta"),
        (lambda: validate_budget(8.0, 1e-5, "gdp-ish"), "accountant"),
        (lambda: validate_clip(0.0), "max-grad-norm"),
        (lambda: validate_clip(-1.0), "max-grad-norm"),
        (lambda: PrivacyLedger(target_epsilon=8.0, delta=2.0), "delta"),
        (lambda: PrivacyLedger(8.0, 1e-5).record(SIGMA, 1.5, 1), "sample rate"),
    ],
)
def test_nonsense_values_are_rejected_with_the_fix(call, key: str) -> None:
    with pytest.raises(ConfigError, match=key) as caught:
        call()
    assert "use" in str(caught.value)


def test_importing_the_ledger_has_no_side_effects() -> None:
    """No opacus import (it calls logging.basicConfig), no environment changes."""
    script = (
        "import os, sys, logging; env = dict(os.environ)\n"
        "import client.privacy_ledger, client.dp_training\n"
        "assert 'opacus' not in sys.modules, 'opacus imported'\n"
        "assert not logging.getLogger().handlers, 'root logger configured'\n"
        "assert dict(os.environ) == env, 'environment changed'\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120, env={**os.environ})


def full_batch_epsilon(sigma: float, steps: int, delta: float) -> float:
    """The exact epsilon of ``steps`` full-batch Gaussian steps: one Gaussian release at ``sigma / sqrt(steps)``.

    At sample rate 1 every step reads every record, so the steps compose into
    one Gaussian mechanism (Balle & Wang 2018, Theorem 8); bisect its delta curve.
    """
    from client.gaussian_release import gaussian_delta

    low, high = 0.0, 200.0
    while high - low > 1e-9:
        middle = (low + high) / 2
        low, high = (middle, high) if gaussian_delta(sigma / math.sqrt(steps), middle) > delta else (low, middle)
    return high


def test_pricing_at_sample_rate_one_is_silent_and_exact(tmp_path: Path) -> None:
    """A site smaller than the probe batch prices full-batch steps: no warning, and q = 1's exact figures."""
    import warnings

    import opacus.accountants  # noqa: F401  (imported before recording: an import may warn on its own)

    from client.mechanisms import sgd_mechanism
    from client.privacy_ledger import epsilon_at
    from client.site_budget import open_budget
    from client.site_policy import site_policy
    from client.site_state import open_state

    sigma, steps, delta, order = 1.2345, 40, 1e-5, 4.0  # an unusual sigma: no memoised figure hides a warning
    mechanism = sgd_mechanism(sigma, expected_batch=128, nominal_records=48, steps=steps, max_grad_norm=1.0)
    assert mechanism.sample_rate == 1.0 and mechanism.expected_batch_size == 48.0  # clamped: 128 > 48 records
    policy = site_policy({"state-dir": str(tmp_path / "state")}, environ={})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ledger = PrivacyLedger(8.0, delta)
        ledger.commit_order(order)
        filtered = ledger.epsilon_if([mechanism.priced_entry])
        opacus_rdp = compute_epsilon([mechanism.ledger_entry], delta, "rdp")
        opacus_prv = compute_epsilon([mechanism.ledger_entry], delta, "prv")
        calibrated = calibrate_noise_multiplier(8.0, delta, 1.0, steps, "prv")
        with open_budget(open_state(tmp_path / "state"), policy) as budget:  # the site's own pricing path
            chosen = budget.noise_multiplier([(1.0, steps, None)])
            full_batch = sgd_mechanism(chosen, 128, 48, steps, 1.0)
            assert budget.can_afford([full_batch])
            budget.record(full_batch)
            spent = budget.facts()["epsilon"]
    assert [str(w.message) for w in caught] == []
    # RDP of the Gaussian mechanism at q = 1 is alpha / (2 sigma^2) per step (Mironov 2017), the filter's figure
    assert filtered == pytest.approx(epsilon_at(steps * order / (2 * sigma**2), order, delta), rel=1e-12)
    best = min(epsilon_at(steps * a / (2 * sigma**2), a, delta) for a in [1 + x / 10.0 for x in range(1, 100)])
    assert opacus_rdp <= best + 1e-9  # Opacus' grid holds all these orders, and more
    assert opacus_prv == pytest.approx(full_batch_epsilon(sigma, steps, delta), abs=0.02)  # PRV's error bound 0.01
    assert compute_epsilon([(calibrated, 1.0, steps)], delta, "prv") <= 8.0 + 0.02
    alpha = budget.ledger.filter_order
    assert spent == pytest.approx(epsilon_at(steps * alpha / (2 * chosen**2), alpha, delta), rel=1e-12)
    assert 8.0 - 0.05 <= spent <= 8.0  # the whole plan, at sample rate 1, calibrated to the budget
