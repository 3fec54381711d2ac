"""The site's privacy ledger: every private mechanism it ever ran, and the guarantee that history gives.

One ledger per site for the whole life of the federation (all rounds, all
tasks, all runs, all restarts). It holds what an Opacus accountant holds (its
``history`` of ``(noise_multiplier, sample_rate, steps)`` entries of the
subsampled Gaussian mechanism) plus the budget (``target_epsilon``,
``delta``) and the **filter order**.

The guarantee is an RDP privacy filter at one fixed order (Feldman and
Zrnic, "Individual Privacy Accounting via a Renyi Filter", NeurIPS 2021,
Theorem 3.1; Lecuyer 2021): the order ``alpha`` is fixed at the site's first
calibration (the best order for the plan it calibrated for) and never
changes; a mechanism runs only if the Renyi divergence of order ``alpha``
summed over the whole history, the new mechanism included, stays within
``B = the RDP budget that converts to target_epsilon at delta``. The filter
theorem holds for any adaptive choice of the mechanisms (noise, sample rate,
steps chosen after seeing earlier outputs, e.g. by a server, or a
recalibrated noise multiplier), so the whole interaction is
``(alpha, B)``-RDP and hence ``(target_epsilon, delta)``-DP by the conversion
of Balle et al. (AISTATS 2020, Theorem 21; Opacus' ``get_privacy_spent``).
``epsilon()`` reports that conversion of the history's RDP at the filter
order. A fresh Opacus accountant over the same history (``compute_epsilon``)
gives a smaller number for a fixed, non-adaptive schedule; it is not the
guarantee here.

**Record groups (parallel composition).** Each entry may name the disjoint
record groups it read (:class:`client.mechanisms.RecordGroups`: cells of a
public partition, e.g. the labels of one class-incremental experience, plus
the replay buffer's earlier experiences). A record's cell is a function of
its own content, so a mechanism that does not read it has the same output
with or without it: its individual Renyi divergence there is 0. The filter
therefore bounds, for every record, the sum over the entries that read its
cell (the individual filter of Feldman and Zrnic, which allows per-record
losses chosen adaptively). The bound used for the worst record is
``universal + sum over partitions of (max over cells)``, where ``universal``
sums the entries that read every record (no groups named: version-2 entries,
joint runs): exact with one partition (the usual case), and an upper bound
when a site's life mixes partitions (a label stream in one run, a group
stream in another). Without groups every entry composes sequentially, as
before. ``divergence`` (the sentinel's figure) stays the sequential sum of
every entry: it only grows, so it also catches a rolled-back entry of a cell
that is not the worst.

On disk it is one JSON file, written atomically (temporary file in the same
folder, fsync, ``os.replace``, fsync of the folder) and guarded by a format
tag, a version and a SHA-256 of its payload. A file that fails any check raises
:class:`LedgerError`. ``client/site_budget.py`` adds the lock, the sentinel
against deletion and rollback, and the pricing of a round.

Opacus is imported inside the functions that need it: importing it configures
the root logger (``opacus.utils.module_utils`` calls ``logging.basicConfig``),
which a module that is merely imported must not do.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.mechanisms import RecordGroups, Step  # Step: (noise_multiplier, sample_rate, steps), as in Opacus
from client.state_files import write_atomic
from fedcl.run_config import ConfigError

ACCOUNTANTS = ("prv", "rdp")  # prv: tightest bound Opacus offers (its default); rdp: the classic one
LEDGER_FORMAT = "fedcl-privacy-ledger"
LEDGER_VERSION = 3  # 3: entries name their record groups; 2: the RDP filter (its order); 1 and 2 are read
READABLE_VERSIONS = (1, 2, LEDGER_VERSION)
FILTER_MECHANISM = "rdp-filter"
MAX_WORKABLE_NOISE = 20.0  # above this the noise std is 20x the clip per step: the update is noise
NOISE_SEARCH_CEILING = 1e6  # Opacus' own MAX_SIGMA; past it no noise level meets the budget


class LedgerError(ValueError):
    """A ledger file that cannot be trusted (corrupt, truncated, foreign or mismatched)."""


class BudgetError(ConfigError):
    """The privacy budget cannot pay for the planned training; the message names a setting that works."""


def validate_budget(target_epsilon: float, delta: float, accountant: str = "prv") -> None:
    """Reject a nonsense budget before any training, with the fix in the message."""
    if not isinstance(target_epsilon, (int, float)) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ConfigError(f"config key 'target-epsilon' = {target_epsilon!r}: use a positive finite number, e.g. 8")
    if not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ConfigError(
            f"config key 'delta' = {delta!r}: use a value strictly between 0 and 1, well below 1/records (e.g. 1e-5)"
        )
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"config key 'accountant' = {accountant!r}: use one of {', '.join(ACCOUNTANTS)}")


def validate_clip(max_grad_norm: float) -> None:
    """Reject a clipping norm that is not a positive finite number."""
    if not isinstance(max_grad_norm, (int, float)) or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise ConfigError(f"config key 'max-grad-norm' = {max_grad_norm!r}: use a positive clipping norm, e.g. 1.0")


def _validate_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not isinstance(noise_multiplier, (int, float)) or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ConfigError(f"noise multiplier {noise_multiplier!r}: use a finite value >= 0 (0 means no privacy)")
    if not isinstance(sample_rate, (int, float)) or not 0.0 < sample_rate <= 1.0:
        raise ConfigError(f"sample rate {sample_rate!r}: use batch size / records, a value in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps {steps!r}: use a whole number >= 0")


def compute_epsilon(history: list[Step], delta: float, accountant: str = "prv") -> float:
    """Epsilon of a whole history of DP steps, by a fresh Opacus accountant.

    0.0 for an empty history; ``math.inf`` if any step had no noise. Results
    are memoised per (history, delta, accountant): a PRV evaluation takes
    0.1-0.3 s per distinct history entry on a CPU, and the hard-stop check and
    the report after the round ask for the same history.
    """
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history if n > 0)
    return _epsilon_of(entries, float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon_of(entries: tuple[Step, ...], delta: float, accountant: str) -> float:
    if not entries:
        return 0.0
    if any(s == 0.0 for s, _, _ in entries):
        return math.inf
    from opacus.accountants import create_accountant

    counter = create_accountant(mechanism=accountant)
    counter.history = list(entries)
    with _full_batch_quiet():
        return float(counter.get_epsilon(delta=delta))


@contextlib.contextmanager
def _full_batch_quiet() -> Iterator[None]:
    """Silence, locally, the two notices Opacus' accountants give for values that are still right.

    At sample rate 1.0 (a site holding fewer records than the batch: every
    step reads every record) Opacus' PRV takes ``log(1 - q) = log(0) = -inf``
    and numpy warns "divide by zero". The -inf is the right limit: the test
    ``t > log(1 - q)`` then holds for every t and the privacy loss is that of
    the plain Gaussian mechanism, exactly the full-batch case
    (tests/test_privacy_ledger.py checks it against the closed form). Opacus'
    RDP notice that the best order lies at an end of its grid is silenced for
    the same reason: the epsilon is still the minimum over the grid, a valid
    (at worst slightly loose) bound. Nothing else is silenced, and only here.
    """
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha", category=UserWarning)
        yield


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "prv"
) -> float:
    """The noise multiplier that keeps ``total_steps`` steps at ``sample_rate`` within ``target_epsilon``.

    ``total_steps`` is the whole federation's plan for this site (all rounds of
    all tasks), not one round's. Uses Opacus' ``get_noise_multiplier``, whose
    answer is the upper end of its bisection: the epsilon it gives is at most
    the target. Raises :class:`BudgetError` when no noise level up to
    ``1e6`` meets the budget.
    """
    validate_budget(target_epsilon, delta, accountant)
    _validate_step(1.0, sample_rate, total_steps)
    if total_steps < 1:
        raise ConfigError(f"total steps {total_steps!r}: plan at least one step")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _full_batch_quiet():
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=accountant,
            )
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise BudgetError(
            f"target-epsilon = {target_epsilon} cannot cover {total_steps} steps at sample rate {sample_rate:.4g} "
            f"with any noise multiplier up to {NOISE_SEARCH_CEILING:g} ({err}); raise target-epsilon or plan fewer steps"
        ) from err
    return float(sigma)


def require_budget_for_one_round(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    accountant: str = "prv",
    max_noise_multiplier: float = MAX_WORKABLE_NOISE,
) -> None:
    """Raise :class:`BudgetError` if even one round cannot be paid at a workable noise level.

    A round of ``steps_per_round`` steps at ``sample_rate`` and noise multiplier
    ``max_noise_multiplier`` (the most noise that still trains) is the cheapest
    useful round; if it already costs more than ``target_epsilon``, the message
    names the smallest target-epsilon that pays for it and the most local steps
    the given budget pays for. Call it at start-up, before any training.
    """
    validate_budget(target_epsilon, delta, accountant)
    _validate_step(max_noise_multiplier, sample_rate, steps_per_round)
    if max_noise_multiplier <= 0:
        raise ConfigError(f"max noise multiplier {max_noise_multiplier!r}: use a positive value")
    cheapest = compute_epsilon([(max_noise_multiplier, sample_rate, steps_per_round)], delta, accountant)
    if cheapest <= target_epsilon:
        return
    affordable, unaffordable = 0, steps_per_round  # epsilon grows with steps: bisect the most steps it pays for
    while unaffordable - affordable > 1:
        middle = (affordable + unaffordable) // 2
        if compute_epsilon([(max_noise_multiplier, sample_rate, middle)], delta, accountant) <= target_epsilon:
            affordable = middle
        else:
            unaffordable = middle
    steps_hint = (
        f", or cut local-steps to {affordable}"
        if affordable
        else ", or lower the sample rate (smaller batch-size or more records per site)"
    )
    raise BudgetError(
        f"target-epsilon = {target_epsilon} (delta {delta:g}, {accountant}) cannot cover even one round of "
        f"{steps_per_round} steps at sample rate {sample_rate:.4g}: even at noise multiplier "
        f"{max_noise_multiplier:g} it costs epsilon {cheapest:.4g}; the smallest workable setting is "
        f"target-epsilon >= {math.ceil(cheapest * 1000) / 1000:g}{steps_hint}"
    )


# Orders of the filter: a coarse version of Opacus' default grid (RDPAccountant.DEFAULT_ALPHAS, 151 orders). Each
# RDP evaluation runs Opacus' per-order series; 26 orders cost ~1/6 of the time and lose < 1% of epsilon here.
FILTER_ORDERS: tuple[float, ...] = (
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    3.5,
    4.0,
    4.5,
    5.0,
    6.0,
    7.0,
    8.0,
    10.0,
    12.0,
    14.0,
    16.0,
    20.0,
    24.0,
    28.0,
    32.0,
    40.0,
    48.0,
    56.0,
    64.0,
    128.0,
)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one step of the Poisson-subsampled Gaussian mechanism at every filter order (Opacus' analysis)."""
    if noise_multiplier == 0.0:
        return tuple(math.inf for _ in FILTER_ORDERS)
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(
        float(v)
        for v in compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(FILTER_ORDERS))
    )


Entry = tuple  # (noise_multiplier, sample_rate, steps) or the same with a 4th item, RecordGroups | None


def split_entry(entry: Entry) -> tuple[Step, RecordGroups | None]:
    """An entry's step ``(noise_multiplier, sample_rate, steps)`` and the record groups it read (None: all)."""
    if len(entry) == 3:
        return (float(entry[0]), float(entry[1]), int(entry[2])), None
    if len(entry) == 4 and (entry[3] is None or isinstance(entry[3], RecordGroups)):
        return (float(entry[0]), float(entry[1]), int(entry[2])), entry[3]
    raise ValueError(f"ledger entry {entry!r}: use (noise_multiplier, sample_rate, steps[, RecordGroups or None])")


def rdp_of(history: Sequence[Entry]) -> list[float]:
    """Renyi divergence of every entry composed in sequence, at every filter order, whatever groups they read."""
    total = [0.0] * len(FILTER_ORDERS)
    for entry in history:
        (sigma, rate, steps), _ = split_entry(entry)
        if steps > 0:
            total = [t + steps * r for t, r in zip(total, _rdp_per_step(sigma, rate))]
    return total


EVERY_RECORD = "*"  # the key of the entries that read every record in :func:`group_rdp`
GroupKey = tuple[str, str] | str  # (partition, cell), or EVERY_RECORD


def group_rdp(entries: Sequence[Entry]) -> dict[GroupKey, np.ndarray]:
    """Renyi divergence per record group at every filter order: ``(partition, cell)`` -> the sum of its entries.

    The entries that read every record are summed under :data:`EVERY_RECORD`
    (and not repeated in the cells).
    """
    sums: dict[GroupKey, np.ndarray] = {EVERY_RECORD: np.zeros(len(FILTER_ORDERS))}
    for entry in entries:
        (sigma, rate, steps), groups = split_entry(entry)
        if steps <= 0:
            continue
        cost = steps * np.asarray(_rdp_per_step(sigma, rate))
        keys: list[GroupKey] = [EVERY_RECORD] if groups is None else [(groups.partition, cell) for cell in groups.cells]
        for key in keys:
            sums[key] = sums.get(key, 0.0) + cost
    return sums


def worst_record_rdp(entries: Sequence[Entry]) -> list[float]:
    """Renyi divergence of the worst-off record at every filter order (see "Record groups" above).

    The entries that read every record plus, per partition, the largest
    per-cell sum at each order.
    """
    sums = group_rdp(entries)
    total = sums.pop(EVERY_RECORD).copy()
    worst: dict[str, np.ndarray] = {}
    for (partition, _), value in sums.items():  # type: ignore[misc]
        worst[partition] = np.maximum(worst.get(partition, 0.0), value)
    for value in worst.values():
        total += value
    return [float(v) for v in total]


def epsilon_at(rdp: float, order: float, delta: float) -> float:
    """(epsilon, delta)-DP of an ``(order, rdp)``-RDP mechanism (Balle et al. 2020, Theorem 21, as Opacus converts)."""
    if math.isinf(rdp):
        return math.inf
    return rdp - (math.log(delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order)


def best_order(history: Sequence[Entry], delta: float) -> float:
    """The filter order whose conversion gives the smallest epsilon for the worst-off record of ``history``."""
    curve = worst_record_rdp(history)
    return min(zip(FILTER_ORDERS, curve), key=lambda pair: epsilon_at(pair[1], pair[0], delta))[0]


@dataclass
class PrivacyLedger:
    """Every private mechanism a site ran, the record groups each read, its budget, and the filter order."""

    target_epsilon: float
    delta: float
    history: list[Step] = field(default_factory=list)
    filter_order: float | None = None  # fixed at the site's first calibration, then never changed
    reads: list[RecordGroups | None] = field(default_factory=list)  # per history entry; None: every record

    def __post_init__(self) -> None:
        validate_budget(self.target_epsilon, self.delta, "rdp")
        self.history = [(float(s), float(q), int(n)) for s, q, n in self.history]
        for entry in self.history:
            _validate_step(*entry)
        if not self.reads:
            self.reads = [None] * len(self.history)
        if len(self.reads) != len(self.history):
            raise LedgerError(f"{len(self.reads)} record-group lists for {len(self.history)} ledger entries")
        if self.filter_order is not None and float(self.filter_order) not in FILTER_ORDERS:
            raise LedgerError(f"filter order {self.filter_order!r} is not one of {FILTER_ORDERS}")

    @property
    def total_steps(self) -> int:
        """All steps recorded so far (monotone over the site's life: the sentinel checks it)."""
        return sum(n for _, _, n in self.history)

    def entries(self) -> list[Entry]:
        """The history with each entry's record groups: ``(noise_multiplier, sample_rate, steps, groups)``."""
        return [(*step, groups) for step, groups in zip(self.history, self.reads)]

    def commit_order(self, order: float) -> None:
        """Fix the filter order (only once: a committed order never changes)."""
        if self.filter_order is None:
            if float(order) not in FILTER_ORDERS:
                raise ValueError(f"filter order {order!r}: use one of {FILTER_ORDERS}")
            self.filter_order = float(order)

    def record(
        self, noise_multiplier: float, sample_rate: float, steps: int, reads: RecordGroups | None = None
    ) -> None:
        """Add ``steps`` steps taken at (``noise_multiplier``, ``sample_rate``) on ``reads`` (None: every record).

        Zero steps record nothing. Consecutive entries with the same settings
        and groups merge, as in Opacus' own accountants.
        """
        _validate_step(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        step = (float(noise_multiplier), float(sample_rate))
        if self.history and self.history[-1][:2] == step and self.reads[-1] == reads:
            self.history[-1] = (*step, self.history[-1][2] + int(steps))
            return
        self.history.append((*step, int(steps)))
        self.reads.append(reads)

    def epsilon_of(self, entries: Sequence[Entry]) -> float:
        """The filter's epsilon for the worst-off record of ``entries``: its RDP at the filter order, converted.

        Before the order is committed, the best order for ``entries``.
        """
        entries = [entry for entry in entries if split_entry(entry)[0][2] > 0]
        if not entries:
            return 0.0
        order = self.filter_order if self.filter_order is not None else best_order(entries, self.delta)
        return epsilon_at(worst_record_rdp(entries)[FILTER_ORDERS.index(order)], order, self.delta)

    def divergence(self, order: float) -> float:
        """Every entry's Renyi divergence at ``order`` summed in sequence (the sentinel's figure: it only grows)."""
        return rdp_of(self.history)[FILTER_ORDERS.index(float(order))]

    def group_divergences(self, order: float) -> dict[str, float]:
        """Per record group, its entries' Renyi divergence at ``order`` (the sentinel's figures).

        Keys: ``'["partition", "cell"]'`` (JSON), and :data:`EVERY_RECORD` for the entries that read every record.
        """
        index = FILTER_ORDERS.index(float(order))
        return {
            key if key == EVERY_RECORD else json.dumps(list(key)): float(value[index])
            for key, value in group_rdp(self.entries()).items()
        }

    def epsilon(self) -> float:
        """Epsilon guaranteed so far to every record (the filter's conversion for the worst-off one)."""
        return self.epsilon_of(self.entries())

    def epsilon_if(self, entries: Sequence[Entry]) -> float:
        """Epsilon after the extra ``entries`` (mechanisms not yet run; 3-tuples read every record)."""
        for entry in entries:
            _validate_step(*split_entry(entry)[0])
        return self.epsilon_of([*self.entries(), *entries])

    def can_afford(self, entries: Sequence[Entry]) -> bool:
        """The filter's stop: True only if every record's history plus ``entries`` stays within ``target_epsilon``."""
        return self.epsilon_if(entries) <= self.target_epsilon

    # --- persistence -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The ledger as plain data (the accountant's history, the filter order and the budget)."""
        return {
            "accountant": {
                "mechanism": FILTER_MECHANISM,
                "history": [
                    list(step) if groups is None else [*step, *groups.to_json()]
                    for step, groups in zip(self.history, self.reads)
                ],
                "filter_order": self.filter_order,
            },
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger atomically: temporary file in the same folder, fsync, rename, fsync the folder."""
        payload = self.state_dict()
        document = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "sha256": _digest(payload), "payload": payload}
        write_atomic(path, json.dumps(document, indent=1).encode("utf-8"))

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, target_epsilon: float | None = None, delta: float | None = None
    ) -> PrivacyLedger:
        """Read a ledger; raise :class:`LedgerError` if it is missing, corrupt, truncated or mismatched.

        Given ``target_epsilon`` or ``delta`` (the site's policy), the file
        must hold the same values: a budget is fixed for the life of the site.
        """
        source = Path(path)
        try:
            raw = source.read_bytes()
        except FileNotFoundError as err:
            raise LedgerError(
                f"privacy ledger {source} does not exist; restore the site's state directory from its backup "
                "(a site that lost its ledger must not train again under the same budget)"
            ) from err
        ledger = _parse(raw, source)
        for name, want in {"target_epsilon": target_epsilon, "delta": delta}.items():
            have = getattr(ledger, name)
            if want is not None and want != have:
                raise LedgerError(
                    f"privacy ledger {source} was written with {name} = {have!r}, the site's policy says "
                    f"{want!r}; a site's budget is fixed for its life: set {name.replace('_', '-')} = {have!r} "
                    "in the site's node config"
                )
        return ledger


def _groups_of(entry: list) -> RecordGroups | None:
    """The record groups of a stored entry: none for ``[s, q, n]``, else ``[s, q, n, partition, [cells]]``."""
    if len(entry) == 3:
        return None
    if len(entry) != 5 or not isinstance(entry[3], str) or not isinstance(entry[4], list):
        raise ValueError(
            f"entry {entry!r} is neither [noise, rate, steps] nor [noise, rate, steps, partition, [cells]]"
        )
    return RecordGroups.of(entry[3], entry[4])


def _digest(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _parse(raw: bytes, source: Path) -> PrivacyLedger:
    """Check and decode a ledger file's bytes."""
    restore = "restore the site's state directory from its backup; never delete the ledger to start again"
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LedgerError(f"privacy ledger {source} is corrupt or truncated ({err}); {restore}") from err
    if not isinstance(document, dict) or document.get("format") != LEDGER_FORMAT:
        raise LedgerError(f"{source} is not a fedcl privacy ledger; point the site at its own state directory")
    if document.get("version") not in READABLE_VERSIONS:
        raise LedgerError(
            f"privacy ledger {source} has version {document.get('version')!r}, this fedcl reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; run the fedcl release that wrote it"
        )
    payload = document.get("payload")
    if not isinstance(payload, dict) or document.get("sha256") != _digest(payload):
        raise LedgerError(f"privacy ledger {source} fails its checksum (edited or damaged); {restore}")
    try:
        counter = payload["accountant"]
        history = [(float(e[0]), float(e[1]), int(e[2])) for e in counter["history"]]
        reads = [_groups_of(e) for e in counter["history"]]
        order = counter.get("filter_order")
        return PrivacyLedger(
            target_epsilon=float(payload["target_epsilon"]),
            delta=float(payload["delta"]),
            history=history,
            filter_order=None if order is None else float(order),
            reads=reads,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise LedgerError(f"privacy ledger {source} has an invalid payload ({err}); {restore}") from err
