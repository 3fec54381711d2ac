"""What a secure round's masked replies hold, and how the server reads their unmasked sum: one class per kind.

:class:`~strategies.secure_rounds.SecureRounds` is the same for every kind;
it asks its release object three things:

- ``layout(arrays)``: the shape of one site's masked reply (ValueError for a
  malformed one, which is left out of the sum); every site in a sum must
  have the same layout;
- ``words(arrays, layout)``: the reply as one flat int64 vector, the input
  the protocol server sums;
- ``decode(total, layout, survivors, current)``: the centred integer sum
  (already unwrapped from ``2**bits``) as the update the aggregator takes
  (``current``: the global arrays the round started from).

:class:`ClassSumRelease` reads the ncm recipe's class sums
(``fedcl/secure_ncm.py``); :class:`AdapterUpdateRelease` the probe and LoRA
rounds' weighted changes (``fedcl/secure_adapter.py``). numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from fedcl.protocol import CLASS_SUMS, MASKED_SUMS, NOISE_VARIANCE
from fedcl.secure_adapter import UPDATE_WEIGHT, join_words, moved_by_weighted_mean, update_layout
from fedcl.secure_ncm import SCALE
from fedcl.secure_quantization import dequantize

Arrays = dict[str, np.ndarray]


class SecureRelease(Protocol):
    """The three questions :class:`~strategies.secure_rounds.SecureRounds` asks about a kind of masked reply."""

    def layout(self, arrays: Mapping[str, np.ndarray]) -> Any:
        """The reply's layout (hashable, comparable); ValueError when it is malformed."""
        ...

    def words(self, arrays: Mapping[str, np.ndarray], layout: Any) -> np.ndarray:
        """The reply as one flat int64 vector."""
        ...

    def decode(
        self,
        total: np.ndarray,
        layout: Any,
        survivors: Mapping[int, Mapping[str, np.ndarray]],
        current: Mapping[str, np.ndarray],
    ) -> Arrays:
        """The update the aggregator takes, from the centred integer sum of the ``survivors``' words."""
        ...


class ClassSumRelease:
    """The ncm release: ``masked-sums`` int64 ``[classes, dim]`` and the public ``noise-variance`` per class."""

    keys = frozenset({MASKED_SUMS, NOISE_VARIANCE})

    def layout(self, arrays: Mapping[str, np.ndarray]) -> tuple[int, ...]:
        """The shape of the masked sums; ValueError for other keys, dtypes or a variance not one per class."""
        masked = np.asarray(arrays.get(MASKED_SUMS))
        variance = np.asarray(arrays.get(NOISE_VARIANCE), dtype=np.float64)
        if set(arrays) != self.keys or masked.dtype != np.int64 or masked.ndim != 2 or variance.shape != (len(masked),):
            raise ValueError(f"a secure ncm release carries exactly {sorted(self.keys)}: int64 [classes, dim] sums")
        return tuple(masked.shape)

    def words(self, arrays: Mapping[str, np.ndarray], layout: tuple[int, ...]) -> np.ndarray:
        """The masked sums, flat."""
        return np.asarray(arrays[MASKED_SUMS], dtype=np.int64).reshape(-1)

    def decode(
        self,
        total: np.ndarray,
        layout: tuple[int, ...],
        survivors: Mapping[int, Mapping[str, np.ndarray]],
        current: Mapping[str, np.ndarray],
    ) -> Arrays:
        """The class sums (dequantised) and the survivors' summed noise variances, as one class-sum update.

        ``current`` is not needed: the class-sum aggregator adds the update to it.
        """
        sums = dequantize(np.asarray(total, dtype=np.int64), SCALE).reshape(layout)
        variance = np.sum(
            [np.asarray(arrays[NOISE_VARIANCE], dtype=np.float64) for arrays in survivors.values()], axis=0
        )
        return {CLASS_SUMS: sums, NOISE_VARIANCE: variance}


class AdapterUpdateRelease:
    """A probe or LoRA round's changes: masked int64 words per tensor plus the weight word (``fedcl/secure_adapter.py``)."""

    def __init__(self, scale: float) -> None:
        """``scale``: ``fedcl.secure_adapter.adapter_scale`` of the run (the sites compute the same)."""
        if not scale > 0:
            raise ValueError(f"scale = {scale}: use fedcl.secure_adapter.adapter_scale(num-sites, max-train-examples)")
        self.scale = float(scale)

    def layout(self, arrays: Mapping[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of each tensor by sorted name; ValueError without the weight word or for non-int64 words."""
        if UPDATE_WEIGHT not in arrays or any(np.asarray(a).dtype != np.int64 for a in arrays.values()):
            raise ValueError(f"a secure update carries int64 words only, its weight in {UPDATE_WEIGHT!r}")
        return tuple(update_layout({name: a for name, a in arrays.items() if name != UPDATE_WEIGHT}))

    def words(self, arrays: Mapping[str, np.ndarray], layout: tuple) -> np.ndarray:
        """The tensors' words in layout order, then the weight word."""
        return join_words(arrays, layout)

    def decode(
        self,
        total: np.ndarray,
        layout: tuple,
        survivors: Mapping[int, Mapping[str, np.ndarray]],
        current: Mapping[str, np.ndarray],
    ) -> Arrays:
        """``current`` moved by the survivors' example-weighted mean change (the plain FedAvg mean, to the rounding)."""
        return moved_by_weighted_mean(current, total, layout, self.scale)
