"""The ledger per record group: disjoint groups compose in parallel, a mechanism costs every group it reads.

References: a hand computation of the Gaussian mechanism's RDP (alpha / (2 sigma^2) per release at sample rate 1)
and Opacus' own RDP accountant fed only the mechanisms that read a given record.
"""

from __future__ import annotations

import json
import math

import pytest

from client.mechanisms import RecordGroups
from client.privacy_ledger import PrivacyLedger, epsilon_at

DELTA, ORDER = 1e-5, 8.0
EXPERIENCES = (RecordGroups.of("label", ["a", "b"]), RecordGroups.of("label", ["c"]), RecordGroups.of("label", ["d"]))


def by_hand(releases: int, sigma: float, order: float = ORDER) -> float:
    """Epsilon of ``releases`` Gaussian releases (sensitivity 1, noise sigma) composed at ``order``."""
    rdp = releases * order / (2 * sigma**2)
    return rdp - (math.log(DELTA) + math.log(order)) / (order - 1) + math.log((order - 1) / order)


def opacus_epsilon(history: list[tuple[float, float, int]], order: float = ORDER) -> float:
    """Opacus' RDP accountant over ``history``, converted at ``order`` (the filter's)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for sigma, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return float(accountant.get_privacy_spent(delta=DELTA, alphas=[order])[0])


def ledger_with(entries: list[tuple]) -> PrivacyLedger:
    ledger = PrivacyLedger(target_epsilon=100.0, delta=DELTA, filter_order=ORDER)
    for entry in entries:
        ledger.record(*entry)
    return ledger


def test_one_release_per_experience_costs_one_release_not_j() -> None:
    sigma = 1.3
    parallel = ledger_with([(sigma, 1.0, 1, groups) for groups in EXPERIENCES])
    assert parallel.epsilon() == pytest.approx(by_hand(1, sigma), rel=1e-9)
    # the same three releases on the same records (or without groups) compose in sequence
    same = ledger_with([(sigma, 1.0, 1, EXPERIENCES[0])] * 3)
    unnamed = ledger_with([(sigma, 1.0, 1)] * 3)
    assert same.epsilon() == pytest.approx(by_hand(3, sigma), rel=1e-9) == unnamed.epsilon()


def test_a_replay_round_costs_every_group_it_reads() -> None:
    probe = (1.0, 0.1, 30)  # experience 0's probe rounds on its own records
    replay = (1.0, 0.08, 30)  # experience 1's pool: its records plus the buffer of experience 0's
    pool = RecordGroups.of("label", [*EXPERIENCES[0].cells, *EXPERIENCES[1].cells])
    ledger = ledger_with([(*probe, EXPERIENCES[0]), (*replay, pool)])
    # a record of experience 0 was read by both mechanisms, one of experience 1 by the replay round only
    assert ledger.epsilon() == pytest.approx(opacus_epsilon([probe, replay]), rel=1e-6)
    assert ledger.epsilon() > opacus_epsilon([probe]) > opacus_epsilon([replay])
    # a replay round that named only its own experience would have been priced as if experience 0 were untouched
    forgetful = ledger_with([(*probe, EXPERIENCES[0]), (*replay, EXPERIENCES[1])])
    assert forgetful.epsilon() == pytest.approx(opacus_epsilon([probe]), rel=1e-6)
    assert forgetful.epsilon() < ledger.epsilon()


def test_entries_that_read_every_record_and_other_partitions_add_to_every_group() -> None:
    sigma = 2.0
    by_label = [(sigma, 1.0, 1, groups) for groups in EXPERIENCES]
    by_group = [
        (sigma, 1.0, 1, RecordGroups.of("group", ["north"])),
        (sigma, 1.0, 1, RecordGroups.of("group", ["south"])),
    ]
    everyone = [(sigma, 1.0, 1)]  # e.g. a joint run, or a version-2 entry
    ledger = ledger_with([*by_label, *by_group, *everyone])
    # a record is in one label cell and one group cell: at most 1 + 1 + 1 releases (an upper bound across partitions)
    assert ledger.epsilon() == pytest.approx(by_hand(3, sigma), rel=1e-9)


def test_the_filter_stops_only_mechanisms_that_read_a_spent_group() -> None:
    sigma = 1.0
    ledger = PrivacyLedger(target_epsilon=by_hand(1, sigma) + 1e-9, delta=DELTA, filter_order=ORDER)
    ledger.record(sigma, 1.0, 1, EXPERIENCES[0])
    assert not ledger.can_afford([(sigma, 1.0, 1, EXPERIENCES[0])])
    assert not ledger.can_afford([(sigma, 1.0, 1)])  # reads every record, experience 0's included
    assert ledger.can_afford([(sigma, 1.0, 1, EXPERIENCES[1]), (sigma, 1.0, 1, EXPERIENCES[2])])


def test_groups_survive_the_file_and_a_version_2_entry_reads_every_record(tmp_path) -> None:
    ledger = ledger_with([(1.5, 1.0, 1, EXPERIENCES[0]), (1.5, 1.0, 1, EXPERIENCES[1])])
    path = tmp_path / "privacy_ledger.json"
    ledger.save(path)
    again = PrivacyLedger.load(path)
    assert again.reads == ledger.reads and again.epsilon() == pytest.approx(ledger.epsilon(), rel=1e-12)
    # an old (version 2) file has no groups: its entries compose in sequence
    document = json.loads(path.read_text())
    history = document["payload"]["accountant"]["history"]
    assert history[0][3:] == ["label", ["a", "b"]]
    old = PrivacyLedger(target_epsilon=100.0, delta=DELTA, history=[tuple(e[:3]) for e in history], filter_order=ORDER)
    assert old.epsilon() == pytest.approx(by_hand(2, 1.5), rel=1e-9)


def test_the_sentinel_divergence_counts_every_entry_in_sequence() -> None:
    ledger = ledger_with([(1.5, 1.0, 1, groups) for groups in EXPERIENCES])
    assert ledger.divergence(ORDER) == pytest.approx(3 * ORDER / (2 * 1.5**2), rel=1e-9)
    assert epsilon_at(ledger.divergence(ORDER), ORDER, DELTA) == pytest.approx(by_hand(3, 1.5), rel=1e-9)


def test_bad_groups_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="at least one cell"):
        RecordGroups.of("label", [])
    with pytest.raises(ValueError, match="needs a name"):
        RecordGroups.of("", ["a"])
