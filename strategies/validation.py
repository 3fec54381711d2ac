"""Checks on one site's reply before any aggregator sees it: sender, example count, tensors.

Each check returns the reason a reply is unacceptable, or None. The expected
tensors are a :data:`Spec` (name -> (shape, dtype)): the server's current
global arrays when it has them, otherwise the spec most replies agree on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np

from strategies.aggregation import SiteUpdate

Spec = dict[str, tuple[tuple[int, ...], np.dtype]]


def spec_of(arrays: Mapping[str, np.ndarray]) -> Spec:
    """The name -> (shape, dtype) description of ``arrays``."""
    return {name: (tuple(np.shape(value)), np.asarray(value).dtype) for name, value in arrays.items()}


def consensus_spec(updates: Sequence[SiteUpdate]) -> Spec:
    """The spec shared by the most updates (the first one seen among equals); empty without updates."""
    specs = [spec_of(u.arrays) for u in updates]
    keys = [tuple(sorted((n, s, d.str) for n, (s, d) in spec.items())) for spec in specs]
    if not keys:
        return {}
    winner = Counter(keys).most_common(1)[0][0]
    return specs[keys.index(winner)]


def sender_problem(update: SiteUpdate, known_sites: Collection[str] | None, max_examples: int | None) -> str | None:
    """Why the sender or its example count is unacceptable, or None."""
    if known_sites is not None and update.site not in known_sites:
        return f"unknown site {update.site!r}"
    count = update.num_examples
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
        return f"num_examples must be a positive integer, got {count!r}"
    if max_examples is not None and count > max_examples:
        return f"num_examples {count} exceeds the bound {max_examples}"
    return None


def _short(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def tensor_problem(arrays: Mapping[str, np.ndarray], spec: Spec, required: Collection[str]) -> str | None:
    """Why ``arrays`` do not match ``spec`` (required names present, no others, shapes, dtypes, finite), or None."""
    missing = [n for n in required if n not in arrays]
    if missing:
        return f"missing tensors: {_short(missing)}"
    unexpected = [n for n in arrays if n not in spec]
    if unexpected:
        return f"unexpected tensors: {_short(unexpected)}"
    for name, value in arrays.items():
        shape, dtype = spec[name]
        if not isinstance(value, np.ndarray):
            return f"{name} is a {type(value).__name__}, not a numpy array"
        if value.shape != shape:
            return f"{name} has shape {value.shape}, expected {shape}"
        if value.dtype != dtype:
            return f"{name} has dtype {value.dtype}, expected {dtype}"
        if not np.isfinite(value).all():
            return f"{name} has non-finite values (NaN or inf)"
    return None


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], names: Iterable[str]) -> float:
    """The L2 norm of ``arrays - reference`` over ``names``, all tensors together (float64)."""
    total = 0.0
    for name in names:
        diff = (arrays[name] - reference[name]).ravel()
        total += float(np.dot(diff, diff))
    return float(np.sqrt(total))
