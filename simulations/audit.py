"""A one-run privacy audit of what a site releases: ``python -m simulations.audit``.

Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023): ``m`` canary records, each added to the site's training data
with probability 1/2 (seeded coins); the site's own mechanism runs once; the
auditor sees the release (white box), scores every canary, guesses "in" for
the highest scores and "out" for the lowest, and turns the number of right
guesses into an epsilon the mechanism provably does NOT satisfy, at
confidence ``1 - beta`` (``simulations/audit_bound.py``). The ledger's epsilon
(the Opacus RDP accountant's epsilon for the calibrated noise) is the upper
bound the audit checks.

Two white-box mechanisms, run through the project's own code:

- ``head``: the private linear probe (``client.dp_training.train_private_features``
  on cached head inputs, ``probe-rounds`` calls of ``probe-steps`` DP-SGD
  steps, expected batch ``probe-batch-size``, SGD momentum 0.9 at
  ``probe-learning-rate``, clip ``max-grad-norm``; the defaults of
  ``fedcl/run_config.py``). A canary is a unit feature vector along one of
  the directions where the site's features have the least energy (together
  10% of it), with a label; at most two canaries, with different labels,
  share a direction. Score: how far the released
  head moved toward the canary, ``(dW[y] - mean of the other rows of dW) . x``
  with ``dW`` the head after minus before. The sample rate is the real site's
  (``probe-batch-size / its records``), so sigma is the one the site would use.
- ``class-sums``: the nearest-class-mean release
  (``client.nearest_class_mean.class_feature_sums`` then ``release_class_sums``,
  Gaussian noise, L2 sensitivity 1). A canary is a unit vector added to one
  class's sum (orthonormal within a class). Score: the inner product of the
  released row minus the known sum of the real records with the canary.

Controls: ``--no-dp`` (no noise, no clipping: the auditor must then find a
clearly positive bound) and ``--break-noise`` (noise forced to 0 while the
ledger still charges the calibrated sigma: the bound must then exceed the
ledger's epsilon, e.g. at ``--target-epsilon 1``).

The noise comes from ``NoiseSource.seeded`` (reproducible from ``--seed``)
unless ``--secure-noise`` asks for the deployment's OS-CSPRNG source; the
audit does not depend on either being secret.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulations.audit_bound import DEFAULT_BETA, DEFAULT_GUESS_FRACTIONS, audit_scores

MECHANISMS = ("head", "class-sums")
FEATURE_SOURCES = ("synthetic", "default")
PROBE_MOMENTUM = 0.9  # the probe's SGD momentum (client/phases.py MOMENTUM)
# Canary directions: the eigenvectors of the site's features with the least energy, together at most this
# share of it. Measured on the default site (3 seeds each, epsilon 8): shares 0.05 / 0.1 / 0.4 / 1.0 gave
# mean bounds 0.77 / 1.21 / 1.27 / 1.09 with 2-3 canaries per direction; the number of canaries matters
# more than avoiding the data, and 0.1 keeps the canaries off the directions the head learns from.
DATA_FREE_ENERGY = 0.1
CANARIES_PER_DIRECTION = 2  # 1: 250 canaries on the default site, mean bound 1.05; 2: 500, 1.21; 3: no better
MAX_HEAD_CANARIES = 1000  # the probe takes seconds either way; past this the training data would be mostly canaries
MAX_CLASS_SUM_CANARIES = 2000  # the release itself is instant; this bounds memory and the guess search only


@dataclass(frozen=True)
class SiteFeatures:
    """One site's cached head inputs: unit feature rows, their labels, and the label count."""

    features: np.ndarray  # float32 [records, dim], rows of norm 1
    labels: np.ndarray  # int64 [records], 0 .. num_classes - 1
    num_classes: int
    source: str  # what they are, for the report

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.labels.shape != (self.features.shape[0],):
            raise ValueError(
                f"features {self.features.shape} and labels {self.labels.shape}: give one feature row per label"
            )
        if self.num_classes < 2 or (
            len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < self.num_classes
        ):
            raise ValueError(f"labels must lie in 0 .. num_classes - 1 with num_classes >= 2 (got {self.num_classes})")

    @property
    def records(self) -> int:
        """How many real records the site holds."""
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """The feature dimension."""
        return int(self.features.shape[1])


@dataclass(frozen=True)
class ProbeSettings:
    """The private probe's schedule: ``rounds`` calls of ``steps`` DP-SGD steps (fresh optimiser each call)."""

    rounds: int = 20
    steps: int = 40
    batch_size: int = 128
    learning_rate: float = 0.25
    momentum: float = PROBE_MOMENTUM
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rounds", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"probe {name} = {value!r}: use a whole number >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"probe learning_rate = {self.learning_rate!r}: use a positive value, e.g. 0.25")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"probe momentum = {self.momentum!r}: use a value in [0, 1), e.g. 0.9")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"probe max_grad_norm = {self.max_grad_norm!r}: use a positive clip, e.g. 1.0")

    @property
    def total_steps(self) -> int:
        """Every DP-SGD step of the probe phase (what the ledger composes)."""
        return self.rounds * self.steps

    @classmethod
    def from_run_config(cls, config: Any) -> ProbeSettings:
        """The probe of a :class:`fedcl.run_config.RunConfig` (probe-rounds, -steps, -batch-size, -learning-rate, clip)."""
        return cls(
            config.probe_rounds,
            config.probe_steps,
            config.probe_batch_size,
            config.probe_learning_rate,
            PROBE_MOMENTUM,
            config.max_grad_norm,
        )


@dataclass(frozen=True)
class AuditSettings:
    """What to audit and how: the budget the noise is calibrated for, the controls, the test's confidence."""

    target_epsilon: float = 8.0
    delta: float = 1e-5
    private: bool = True  # False: the non-private control (no noise, no clipping)
    break_noise: bool = False  # True: noise forced to 0, the ledger still charges the calibrated sigma
    seed: int = 0
    beta: float = DEFAULT_BETA
    guess_fractions: tuple[float, ...] = DEFAULT_GUESS_FRACTIONS
    secure_noise: bool = False

    def __post_init__(self) -> None:
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"target epsilon {self.target_epsilon!r}: use a positive value, e.g. 8")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta {self.delta!r}: use a value in (0, 1), e.g. 1e-5")
        if self.break_noise and not self.private:
            raise ValueError("--break-noise fakes the noise of a private run: use it with --dp, not --no-dp")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed {self.seed!r}: use a whole number >= 0")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta {self.beta!r}: use a significance level in (0, 1), e.g. 0.05")


@dataclass(frozen=True)
class Canaries:
    """The canary records and their coins: ``included[i]`` says whether canary ``i`` joins the training data."""

    features: np.ndarray  # float32 [m, dim], unit rows
    labels: np.ndarray  # int64 [m]
    included: np.ndarray  # bool [m]

    def __len__(self) -> int:
        return int(len(self.labels))


@dataclass(frozen=True)
class AuditReport:
    """One audit run: the guesses, the empirical lower bound and the ledger's upper bound on epsilon."""

    mechanism: str
    features: str
    canaries: int
    included: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    ledger_epsilon: float | None  # None: no DP (the non-private control)
    target_epsilon: float
    delta: float
    beta: float
    guess_sets_tested: int
    dp: bool
    break_noise: bool
    noise_multiplier_calibrated: float | None
    noise_multiplier_used: float
    max_grad_norm: float | None
    sample_rate: float
    steps: int
    records: int
    seed: int
    mean_score_in: float
    mean_score_out: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def synthetic_features(
    records: int = 400, dim: int = 128, classes: int = 5, subspace: int = 12, seed: int = 0
) -> SiteFeatures:
    """Random clustered unit vectors that, like sentence embeddings, live near a low-dimensional subspace.

    Each class has a random centre in a ``subspace``-dimensional subspace of
    ``R^dim``; a record is its class centre plus within-subspace spread plus
    a little isotropic noise, scaled to norm 1. Fast, for tests.
    """
    if not 2 <= subspace < dim:
        raise ValueError(f"subspace {subspace!r}: use 2 .. dim - 1 so that data-free directions exist")
    if records < classes or classes < 2:
        raise ValueError(f"records {records!r}, classes {classes!r}: use at least 2 classes and a record per class")
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, subspace)))[0]  # [dim, subspace], orthonormal columns
    centres = rng.normal(size=(classes, subspace))
    labels = rng.integers(0, classes, size=records)
    inner = centres[labels] + 0.6 * rng.normal(size=(records, subspace))
    rows = inner @ basis.T + 0.002 * rng.normal(size=(records, dim))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return SiteFeatures(
        rows.astype(np.float32),
        labels.astype(np.int64),
        classes,
        f"synthetic ({records} records, dim {dim}, {classes} classes)",
    )


def default_site_features(site: int = 0) -> tuple[SiteFeatures, ProbeSettings]:
    """The default scenario's site ``site``: frozen mean-pooled MiniLM head inputs of its training records.

    Uses the run-config defaults of ``pyproject.toml`` (BBC News, Dirichlet
    split, seed, max length) and the project's own code: the dataset and
    split (``simulations.data_sources``, ``simulations.scenarios``), the model
    (``fedcl.model_factory.load_adapter_model``), tokenisation
    (``client.local_training.encode``) and the head inputs the probe trains
    on (``client.head_features.head_inputs``; with ``pooling = "mean"`` these
    are the unit-length mean-pooled features the class-sum release sums too).
    Takes about a minute on 2 cores. Returns the features and the probe
    settings of the same run config.
    """
    from client.head_features import head_inputs
    from client.local_training import encode
    from fedcl.model_factory import configure_torch_threads, load_adapter_model
    from fedcl.run_config import parse_run_config
    from simulations.data_sources import load_dataset
    from simulations.run import pyproject_defaults
    from simulations.scenarios import split_sites

    configure_torch_threads()
    config = parse_run_config(pyproject_defaults())
    data = load_dataset(config)
    sites = split_sites(data.labels, data.groups, config)
    if not 0 <= site < len(sites):
        raise ValueError(f"site {site!r}: the default scenario has sites 0 .. {len(sites) - 1}")
    split = sites[site]
    adapter = load_adapter_model(config, num_labels=len(data.label_names))
    encoded = encode(
        adapter.tokenizer, [data.texts[i] for i in split.train], data.labels[split.train], config.max_length
    )
    features = head_inputs(adapter.model, encoded, config.eval_batch_size).cpu().numpy().astype(np.float32)
    source = (
        f"default scenario {split.name}: {len(split.train)} {config.dataset} training records, "
        f"{config.pooling}-pooled features of {config.model}"
    )
    return (
        SiteFeatures(features, data.labels[split.train].astype(np.int64), len(data.label_names), source),
        ProbeSettings.from_run_config(config),
    )


def data_free_directions(features: np.ndarray, energy: float = DATA_FREE_ENERGY) -> np.ndarray:
    """Orthonormal directions (rows) that together carry at most ``energy`` of the features' squared norm.

    The eigenvectors of ``features^T features`` with the smallest eigenvalues,
    as many as fit in the share ``energy`` (at least one). A canary along them
    meets the real records' gradients little, so its own effect on a linear
    head stands out. Raises ValueError unless ``0 < energy <= 1``.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy {energy!r}: use a share of the features' energy in (0, 1], e.g. 0.1")
    features = np.asarray(features, dtype=np.float64)
    values, vectors = np.linalg.eigh(features.T @ features)  # ascending eigenvalues
    share = np.cumsum(np.clip(values, 0.0, None)) / max(float(np.clip(values, 0.0, None).sum()), 1e-300)
    count = max(1, int(np.searchsorted(share, energy, side="right")))
    return vectors[:, :count].T.copy()


def head_canary_capacity(site: SiteFeatures, energy: float = DATA_FREE_ENERGY) -> int:
    """The most head canaries this site allows: ``CANARIES_PER_DIRECTION`` (distinct labels) per data-free direction."""
    return len(data_free_directions(site.features, energy)) * min(CANARIES_PER_DIRECTION, site.num_classes)


def head_canaries(site: SiteFeatures, count: int, seed: int, energy: float = DATA_FREE_ENERGY) -> Canaries:
    """``count`` head canaries: unit vectors along data-free directions, each direction shared by distinct labels.

    The canaries are spread over as many data-free directions as there are
    (randomly rotated within that subspace), at most
    ``CANARIES_PER_DIRECTION`` per direction, with distinct random labels on
    one direction. Coins are fair and drawn from ``seed``. Raises ValueError
    when ``count`` exceeds :func:`head_canary_capacity`.
    """
    free = data_free_directions(site.features, energy)
    per = min(CANARIES_PER_DIRECTION, site.num_classes)
    capacity = len(free) * per
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= capacity:
        raise ValueError(
            f"canaries {count!r}: this site has {len(free)} data-free directions x {per} labels each; "
            f"use 1 .. {capacity}"
        )
    design = np.random.default_rng([seed, 1])
    rotation = np.linalg.qr(design.normal(size=(len(free), len(free))))[0]
    directions = rotation @ free  # still orthonormal, still in the data-free subspace
    used = min(count, len(free))
    per_direction = math.ceil(count / used)
    choices = [design.permutation(site.num_classes)[:per_direction] for _ in range(used)]  # distinct per direction
    features, labels = [], []
    for turn in range(per_direction):  # every direction once before any twice: the first `count` are spread evenly
        for j in range(used):
            features.append(directions[j])
            labels.append(int(choices[j][turn]))
    features_array = np.asarray(features[:count], dtype=np.float32)
    features_array /= np.linalg.norm(features_array, axis=1, keepdims=True)
    return Canaries(features_array, np.asarray(labels[:count], dtype=np.int64), _coins(count, seed))


def class_sum_canaries(site: SiteFeatures, count: int, seed: int) -> Canaries:
    """``count`` class-sum canaries: unit vectors, orthonormal within each class, classes dealt round-robin.

    Raises ValueError when ``count`` exceeds ``num_classes * dim`` (no more
    orthonormal vectors exist).
    """
    capacity = site.num_classes * site.dim
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= capacity:
        raise ValueError(f"canaries {count!r}: use 1 .. {capacity} ({site.num_classes} classes x dimension {site.dim})")
    design = np.random.default_rng([seed, 1])
    basis = np.linalg.qr(design.normal(size=(site.dim, site.dim)))[0].T  # rows: a random orthonormal basis
    labels = np.asarray([i % site.num_classes for i in range(count)], dtype=np.int64)
    features = np.asarray([basis[i // site.num_classes] for i in range(count)], dtype=np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return Canaries(features, labels, _coins(count, seed))


def _coins(count: int, seed: int) -> np.ndarray:
    """Fair, independent inclusion coins, from their own stream of ``seed``."""
    return np.random.default_rng([seed, 2]).random(count) < 0.5


def default_canaries(mechanism: str, site: SiteFeatures) -> int:
    """The default canary count: as many as the canary design allows, within a few minutes on 2 cores."""
    if mechanism == "head":
        return min(head_canary_capacity(site), MAX_HEAD_CANARIES)
    return min(site.num_classes * site.dim, MAX_CLASS_SUM_CANARIES)


def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier Opacus' RDP accountant gives for ``steps`` subsampled Gaussian steps at the target."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # "optimal order is the largest alpha": the RDP bound is looser, still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
            )
        )


def ledger_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of Opacus' RDP accountant after ``steps`` steps of (noise_multiplier, sample_rate): the upper bound."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta))


def _noise_source(settings: AuditSettings) -> Any:
    from client.secure_noise import NoiseSource

    if settings.secure_noise:
        return NoiseSource.secure()
    return NoiseSource.seeded(int(np.random.SeedSequence([settings.seed, 3]).generate_state(1)[0]))


def _report(
    mechanism: str,
    site: SiteFeatures,
    canaries: Canaries,
    scores: np.ndarray,
    settings: AuditSettings,
    calibrated: float | None,
    used: float,
    clip: float | None,
    sample_rate: float,
    steps: int,
    epsilon: float | None,
    started: float,
) -> AuditReport:
    bound = audit_scores(scores, canaries.included, settings.delta, settings.beta, settings.guess_fractions)
    inside, outside = scores[canaries.included], scores[~canaries.included]
    return AuditReport(
        mechanism=mechanism,
        features=site.source,
        canaries=len(canaries),
        included=bound.included,
        k_plus=bound.k_plus,
        k_minus=bound.k_minus,
        guesses=bound.guesses,
        correct=bound.correct,
        epsilon_lower_bound=bound.epsilon_lower_bound,
        ledger_epsilon=epsilon,
        target_epsilon=settings.target_epsilon,
        delta=settings.delta,
        beta=settings.beta,
        guess_sets_tested=bound.tests,
        dp=settings.private,
        break_noise=settings.break_noise,
        noise_multiplier_calibrated=calibrated,
        noise_multiplier_used=used,
        max_grad_norm=clip,
        sample_rate=sample_rate,
        steps=steps,
        records=site.records,
        seed=settings.seed,
        mean_score_in=float(inside.mean()) if len(inside) else math.nan,
        mean_score_out=float(outside.mean()) if len(outside) else math.nan,
        seconds=time.perf_counter() - started,
    )


def audit_head(
    site: SiteFeatures, probe: ProbeSettings, settings: AuditSettings, canary_count: int | None = None
) -> AuditReport:
    """Audit the private linear probe once: train a zero-initialised head on the site's records plus the included canaries.

    Runs ``client.dp_training.train_private_features`` ``probe.rounds`` times
    (``probe.steps`` steps each, fresh optimiser, as the site's probe rounds
    do) at the real site's sample rate ``probe.batch_size / site.records``.
    The noise is calibrated with Opacus' RDP accountant for all
    ``probe.total_steps`` steps at ``settings.target_epsilon``; the run uses
    it (private), 0 with the clip kept (``break_noise``), or 0 with no clip
    (``private = False``). Returns the report; raises ValueError for a canary
    count the site's data-free directions cannot hold.
    """
    import torch

    from client.dp_training import train_private_features
    from client.mechanisms import UNBOUNDED_CLIP, SgdMechanism

    started = time.perf_counter()
    count = default_canaries("head", site) if canary_count is None else canary_count
    canaries = head_canaries(site, count, settings.seed)
    sample_rate = min(1.0, probe.batch_size / site.records)
    calibrated = (
        calibrated_noise(settings.target_epsilon, settings.delta, sample_rate, probe.total_steps)
        if settings.private
        else None
    )
    used = calibrated if settings.private and not settings.break_noise else 0.0
    clip = probe.max_grad_norm if settings.private else UNBOUNDED_CLIP
    expected_batch = sample_rate * (site.records + len(canaries) / 2)  # the expected size of the batches drawn
    mechanism = SgdMechanism(float(used), sample_rate, probe.steps, float(clip), float(expected_batch))
    features = torch.from_numpy(np.concatenate([site.features, canaries.features[canaries.included]]))
    labels = torch.from_numpy(np.concatenate([site.labels, canaries.labels[canaries.included]]))
    head = torch.nn.Linear(site.dim, site.num_classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    before = head.weight.detach().double().numpy().copy()
    noise = _noise_source(settings)
    for _ in range(probe.rounds):
        train_private_features(
            head, features, labels, mechanism, probe.learning_rate, noise, optimizer="sgd", momentum=probe.momentum
        )
    moved = head.weight.detach().double().numpy() - before  # [classes, dim]
    scores = head_scores(moved, canaries)
    epsilon = (
        ledger_epsilon(calibrated, sample_rate, probe.total_steps, settings.delta) if calibrated is not None else None
    )
    return _report(
        "head",
        site,
        canaries,
        scores,
        settings,
        calibrated,
        float(used),
        float(probe.max_grad_norm) if settings.private else None,
        sample_rate,
        probe.total_steps,
        epsilon,
        started,
    )


def head_scores(moved: np.ndarray, canaries: Canaries) -> np.ndarray:
    """``(dW[y] - mean of the other rows of dW) . x`` per canary ``(x, y)``: how far the head moved toward it."""
    along = canaries.features.astype(np.float64) @ moved.T  # [m, classes]: dW x for every canary
    own = along[np.arange(len(canaries)), canaries.labels]
    classes = moved.shape[0]
    return own - (along.sum(axis=1) - own) / (classes - 1)


def audit_class_sums(site: SiteFeatures, settings: AuditSettings, canary_count: int | None = None) -> AuditReport:
    """Audit the nearest-class-mean release once: noisy class sums of the site's records plus the included canaries.

    Sums with ``client.nearest_class_mean.class_feature_sums`` and releases
    every class with ``release_class_sums`` (sensitivity 1), noise calibrated
    with Opacus' RDP accountant for one Gaussian release at
    ``settings.target_epsilon`` (0 under ``break_noise`` or
    ``private = False``). Score of canary ``(x, y)``: ``(released[y] -
    real records' sum[y]) . x`` (the auditor knows every record but the coins).
    """
    from client.nearest_class_mean import class_feature_sums, release_class_sums

    started = time.perf_counter()
    count = default_canaries("class-sums", site) if canary_count is None else canary_count
    canaries = class_sum_canaries(site, count, settings.seed)
    calibrated = calibrated_noise(settings.target_epsilon, settings.delta, 1.0, 1) if settings.private else None
    used = calibrated if settings.private and not settings.break_noise else 0.0
    known = class_feature_sums(site.features, site.labels, site.num_classes)
    sums = class_feature_sums(
        np.concatenate([site.features, canaries.features[canaries.included]]),
        np.concatenate([site.labels, canaries.labels[canaries.included]]),
        site.num_classes,
    )
    release = release_class_sums(sums, range(site.num_classes), float(used), _noise_source(settings))
    extra = np.asarray(release.sums, dtype=np.float64) - known  # [classes, dim]
    scores = np.einsum("md,md->m", canaries.features.astype(np.float64), extra[canaries.labels])
    epsilon = ledger_epsilon(calibrated, 1.0, 1, settings.delta) if calibrated is not None else None
    return _report(
        "class-sums", site, canaries, scores, settings, calibrated, float(used), 1.0, 1.0, 1, epsilon, started
    )


def format_table(reports: Sequence[AuditReport]) -> str:
    """A small text table: mechanism, m, guesses, correct, empirical epsilon lower bound, ledger epsilon."""
    header = ("mechanism", "m", "guesses (in/out)", "correct", "eps lower bound", "ledger eps (upper)")
    rows = [header]
    for report in reports:
        ledger = "none (no DP)" if report.ledger_epsilon is None else f"{report.ledger_epsilon:.3f}"
        if report.break_noise:
            ledger += " (noise off!)"
        rows.append(
            (
                report.mechanism,
                str(report.canaries),
                f"{report.guesses} ({report.k_plus}/{report.k_minus})",
                str(report.correct),
                f"{report.epsilon_lower_bound:.3f}",
                ledger,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated shares, e.g. 0.05,0.1,0.2,0.4,1") from err
    if not values or not all(0.0 < value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every share must be in (0, 1], e.g. 0.05,0.1,0.2,0.4,1")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m simulations.audit``."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.audit",
        description="One-run privacy audit (Steinke, Nasr, Jagielski 2023) of a site's private head or class-sum "
        "release: prints an empirical lower bound on epsilon next to the ledger's upper bound.",
    )
    parser.add_argument(
        "--mechanism",
        choices=MECHANISMS,
        default="head",
        help="head: the private linear probe (DP-SGD on cached features); class-sums: the "
        "nearest-class-mean Gaussian release of per-class feature sums (default: head)",
    )
    parser.add_argument(
        "--canaries",
        type=int,
        default=None,
        metavar="M",
        help="canary count m, each included with probability 1/2 (default: the most the canary "
        f"design allows, capped at {MAX_HEAD_CANARIES} for head and {MAX_CLASS_SUM_CANARIES} "
        "for class-sums; more canaries, more power)",
    )
    parser.add_argument(
        "--target-epsilon",
        type=float,
        default=8.0,
        help="the epsilon the noise is calibrated for (Opacus RDP accountant), i.e. the ledger's "
        "upper bound (default: 8)",
    )
    parser.add_argument(
        "--delta", type=float, default=1e-5, help="delta of the calibration and of the bound (default: 1e-5)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the canary design, the inclusion coins and (unless --secure-noise) the noise",
    )
    parser.add_argument(
        "--dp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--dp (default): the private mechanism; --no-dp: the non-private control, no noise "
        "and no clipping, where a working auditor must find a clearly positive bound",
    )
    parser.add_argument(
        "--break-noise",
        action="store_true",
        help="a deliberately broken mechanism: noise forced to 0 (clipping kept) while the ledger "
        "still charges the calibrated sigma; the bound should exceed the ledger's epsilon "
        "at a small target such as --target-epsilon 1",
    )
    parser.add_argument(
        "--features",
        choices=FEATURE_SOURCES,
        default="synthetic",
        help="synthetic: random clustered unit vectors (fast, for tests); default: the default "
        "scenario's first site, frozen mean-pooled MiniLM features of its BBC News training "
        "records with the run config's probe settings (about a minute to embed)",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=DEFAULT_BETA,
        help="significance of the bound: it holds with confidence 1 - beta (default: 0.05)",
    )
    parser.add_argument(
        "--guess-fractions",
        type=_fractions,
        default=DEFAULT_GUESS_FRACTIONS,
        metavar="F,F,...",
        help="shares of the canaries to guess (half in, half out) tried; each is tested at beta "
        "divided by their number (default: 0.05,0.1,0.2,0.4,0.8)",
    )
    parser.add_argument(
        "--secure-noise",
        action="store_true",
        help="draw the noise from the OS CSPRNG as a deployment does (default: seeded from --seed, reproducible)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, metavar="FILE.json", help="also write the report as JSON to this file"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one audit from the command line, print the table, optionally write JSON; 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = AuditSettings(
            args.target_epsilon,
            args.delta,
            args.dp,
            args.break_noise,
            args.seed,
            args.beta,
            tuple(args.guess_fractions),
            args.secure_noise,
        )
        if args.features == "default":
            site, probe = default_site_features()
        else:
            site, probe = synthetic_features(seed=args.seed), ProbeSettings()
        if args.mechanism == "head":
            report = audit_head(site, probe, settings, args.canaries)
        else:
            report = audit_class_sums(site, settings, args.canaries)
    except ValueError as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    print(f"features: {report.features}")
    print(
        f"noise multiplier: calibrated {report.noise_multiplier_calibrated}, used {report.noise_multiplier_used}; "
        f"sample rate {report.sample_rate:.4g}, {report.steps} steps; {report.included} of {report.canaries} "
        f"canaries included; mean score in {report.mean_score_in:.4g}, out {report.mean_score_out:.4g}"
    )
    print(format_table([report]))
    print(
        f"confidence {1 - report.beta:.0%} (each of {report.guess_sets_tested} guess sets at beta/"
        f"{report.guess_sets_tested}); {report.seconds:.1f} s"
    )
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
