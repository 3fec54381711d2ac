"""The public parameters of an adapter update under secure aggregation, shared by the sites and the server.

What a site masks in a probe or LoRA round of a secure run is the change of
its trained tensors from the global ones it received, ``delta = theta -
theta_global`` (the tensors a plain reply carries, less what the message
brought), weighted by its public nominal size ``w`` (the plain FedAvg
weight): the words ``round(S * w * delta)`` of every tensor, in sorted name
order, followed by one word ``w``. The server unmasks the sum of the sites
that finished and moves its global tensors by ``sum(w delta) / sum(w)``:
the example-weighted FedAvg mean, without seeing a site's tensors or its
weight. A tensor the round did not train (the LoRA factors in a probe round)
has ``delta = 0`` exactly at every site, so it stays exactly as it was (and
the sites' cached features of the adapter stay valid).

- :data:`VALUE_BOUND` bounds every coordinate of ``delta`` (a site clamps to
  it first; its log says when it did, its reply does not);
- :func:`adapter_scale` is the power of two ``S`` whose words of at most
  ``num-sites`` sites, each of at most ``max-train-examples`` records, never
  wrap in :data:`ADAPTER_BITS` bits;
- rounding is randomised (unbiased), so the mean's error is below ``1/S``
  per coordinate and zero on average.

The DP noise of these rounds is each site's full local DP-SGD noise, as in a
plain run (README, "Secure aggregation"): secure aggregation hides each
site's update from the server, it does not lower the noise of these rounds.
numpy only: the server imports it (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedcl.secure_ncm import MAX_BITS, records_bound

ADAPTER_BITS = MAX_BITS  # the widest words fedcl.secure_aggregation takes: the most precision for the update
VALUE_BOUND = 64.0  # |change| of a coordinate in one round (LoRA factors and head weights move far less)
MIN_SCALE_BITS = 12  # below 2**12 units per unit the rounding error of a small site's update would show
UPDATE_WEIGHT = "update-weight"  # the word that carries the site's FedAvg weight (its public nominal size)


def adapter_scale(num_sites: int, max_train_examples: int, bits: int = ADAPTER_BITS) -> float:
    """``S = 2**k``, the largest such that ``num_sites`` sites' words never pass the centred range of ``bits`` bits.

    A site's word on a coordinate is at most ``w (S * VALUE_BOUND + 1)`` (the
    rounding adds at most one unit) and its weight word ``w``, with ``w`` at
    most the public record bound (``max-train-examples``, else
    ``fedcl.secure_ncm.UNDECLARED_RECORDS``). Raises ValueError when ``S``
    would fall below ``2**MIN_SCALE_BITS`` (declare ``max-train-examples``,
    or use fewer sites).
    """
    if num_sites < 1:
        raise ValueError(f"num_sites = {num_sites}: use the run's num-sites (>= 1)")
    room = 2.0 ** (int(bits) - 1) / (float(num_sites) * float(records_bound(max_train_examples)))
    units = (room - 2.0) / VALUE_BOUND  # 2: the rounding's extra unit and the weight word
    if units < 2.0**MIN_SCALE_BITS:
        raise ValueError(
            f"{num_sites} sites of up to {records_bound(max_train_examples)} records each leave {units:.3g} units per "
            f"unit in {bits}-bit words (at least 2**{MIN_SCALE_BITS} needed): declare max-train-examples (the most "
            "training records any site holds) or use fewer sites"
        )
    return 2.0 ** math.floor(math.log2(units))


def update_layout(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """The order the words of ``arrays`` travel in: (name, shape) by sorted name; the weight word comes last."""
    if UPDATE_WEIGHT in arrays:
        raise ValueError(f"a tensor named {UPDATE_WEIGHT!r} would clash with the weight word: rename it")
    return [(name, tuple(np.shape(arrays[name]))) for name in sorted(arrays)]


def split_words(vector: np.ndarray, layout: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """A flat vector of words back into ``{name: words of its shape}`` plus ``{UPDATE_WEIGHT: [w]}``."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in layout]
    vector = np.asarray(vector).reshape(-1)
    if len(vector) != sum(sizes) + 1:
        raise ValueError(f"{len(vector)} words for a layout of {sum(sizes)} coordinates plus the weight word")
    out: dict[str, np.ndarray] = {}
    start = 0
    for (name, shape), size in zip(layout, sizes, strict=True):
        out[name] = vector[start : start + size].reshape(shape)
        start += size
    out[UPDATE_WEIGHT] = vector[start:]
    return out


def join_words(words: Mapping[str, np.ndarray], layout: Sequence[tuple[str, tuple[int, ...]]]) -> np.ndarray:
    """The inverse of :func:`split_words`: one flat int64 vector (tensors in layout order, the weight word last).

    Raises ValueError when a name is missing or extra, or a shape differs.
    """
    expected = {name for name, _ in layout} | {UPDATE_WEIGHT}
    if set(words) != expected:
        raise ValueError(f"words for {sorted(words)[:4]}...; the layout needs {sorted(expected)[:4]}...")
    parts = []
    for name, shape in layout:
        part = np.asarray(words[name])
        if tuple(part.shape) != tuple(shape):
            raise ValueError(f"{name}: words of shape {part.shape}, the layout says {shape}")
        parts.append(part.reshape(-1))
    weight = np.asarray(words[UPDATE_WEIGHT]).reshape(-1)
    if weight.shape != (1,):
        raise ValueError(f"{UPDATE_WEIGHT}: {weight.shape} words, one expected")
    return np.concatenate([*parts, weight]).astype(np.int64)


def moved_by_weighted_mean(
    current: Mapping[str, np.ndarray], total: np.ndarray, layout: Sequence[tuple[str, tuple[int, ...]]], scale: float
) -> dict[str, np.ndarray]:
    """``current`` moved by the sites' example-weighted mean change, read from the unmasked, centred sum ``total``.

    Every tensor of ``current`` is returned (float32); a tensor of the
    layout changes by ``sum(w delta) / sum(w)``. Raises ValueError when the
    weight word's sum is not positive (the sum wrapped, or holds no site's
    weight), or when the layout names a tensor ``current`` lacks or shapes
    one otherwise.
    """
    parts = split_words(np.asarray(total, dtype=np.int64), layout)
    weight = int(parts.pop(UPDATE_WEIGHT)[0])
    if weight <= 0:
        raise ValueError(f"the weights of the sites in the sum add up to {weight}: the sum is not a secure update sum")
    moved = {name: np.asarray(value, dtype=np.float32) for name, value in current.items()}
    for name, words in parts.items():
        if name not in moved or moved[name].shape != words.shape:
            raise ValueError(f"the sum changes {name!r}, which the global model lacks or shapes otherwise")
        change = words.astype(np.float64) / (scale * weight)
        moved[name] = (moved[name].astype(np.float64) + change).astype(np.float32)
    return moved
