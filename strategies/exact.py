"""Exact aggregation of LoRA updates: the mean of the products B_i A_i, re-factorised to rank r.

For every LoRA layer the server forms the example-weighted mean of the sites'
products M = sum_i w_i B_i A_i (dense, out x in, accumulated in float64) and returns the
rank-r factors of its truncated SVD U S V^T. A keeps the scale the sites' A
had: A = a V_r^T and B = U_r S_r / a, with a the RMS row norm of the sites'
weighted-mean A (so local training sees the same factor scales as under FedAvg
and FFA: LoRA's B starts small and A at its initialisation scale, and DP
clipping splits its budget between them the same way; with no A scale to keep,
the singular values are split evenly, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T).
Components beyond M's numerical rank get a zero B column and an A row along
the next right singular vector: B A is unchanged and those components can
still train (with both factors zero their gradients would be zero forever).
A layer whose M is exactly zero (every B_i = 0, e.g. the linear-probe phase)
keeps the weighted means of its factors, i.e. the shared seeded A and B = 0,
exactly as FedAvg would. When M has rank <= r (for
example few sites, or sites whose updates share a subspace) B A reproduces M
to float32 precision; otherwise B A is the best rank-r approximation
(Eckart-Young). The head and any other tensor are averaged as in FedAvg.
The LoRA scaling alpha/r is the same at every site, so it cancels out.

The part beyond rank r, R = M - B A, is a residual per layer (dense, out x in;
12 x 384 x 384 float32 = 7.1 MB for MiniLM with LoRA on query and value,
about 24 times the adapter, so it is not sent). Two choices, ``residual=``:

- ``"carry"`` (default): the server keeps R and adds it to the next round's
  target (error feedback: the server's intended global update is B A + R, and
  what rank r could not hold this round is offered to the factorisation again
  next round instead of being lost). Whatever is still in R at the end is the
  exported adapter's approximation error.
- ``"drop"``: R is discarded every round.

Either way its size is reported: ``last_residual_norms`` (Frobenius norm per
layer, keyed by the layer's ``lora_BA`` name) and ``last_relative_residual``
(||R|| / ||target|| over all layers; 0 when rank r holds everything), which
the server can log to metrics.jsonl. ``residuals`` holds the carried R and
:meth:`ExactAggregator.state_dict` returns it for a checkpoint.

Cost per layer: forming M is O(n r out in); the SVD is O(out in min(out, in)),
about 30 ms for 384 x 384 on one core, independent of the number of sites.
Note that the returned factors are in a new basis every round, so tensor-wise
server optimisers (FedAdam, FedYogi) do not compose with this aggregator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from strategies.aggregation import LORA_A, Arrays, SiteUpdate, common_names, example_weights, lora_pairs, stacked
from strategies.combine import combine_tensors, weighted_mean

RESIDUAL_MODES = ("carry", "drop")
STATE_PREFIX = "residual/"


def residual_name(a_name: str) -> str:
    """The name of the dense residual kept for the layer whose A factor is ``a_name`` (``lora_BA``)."""
    prefix, suffix = a_name.split(LORA_A, 1)
    return prefix + "lora_BA" + suffix


def mean_product(b_stack: np.ndarray, a_stack: np.ndarray, weights: np.ndarray, block: int = 64) -> np.ndarray:
    """sum_i w_i B_i A_i for B stacked as (n, out, r) and A as (n, r, in), as float64.

    Each block of ``block`` sites is one float32 matrix product (block * r terms,
    relative error ~1e-7 of the terms' size); the blocks are summed in float64.
    At 1,000 sites that is 2.5x faster than float64 throughout.
    """
    n, out, rank = b_stack.shape
    weighted = b_stack.astype(np.float32) * np.asarray(weights, dtype=np.float32)[:, None, None]
    a_stack = a_stack.astype(np.float32)
    total = np.zeros((out, a_stack.shape[2]))
    for start in range(0, n, block):
        b_wide = weighted[start : start + block].transpose(1, 0, 2).reshape(out, -1)
        total += b_wide @ a_stack[start : start + block].reshape(-1, a_stack.shape[2])
    return total


RANK_TOLERANCE = 1e-7  # singular values below this fraction of the largest count as zero


def truncated_factors(matrix: np.ndarray, rank: int, a_row_norm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Float32 factors B (out, rank) and A (rank, in) of the rank-``rank`` truncated SVD of ``matrix``.

    With ``a_row_norm`` > 0 every row of A is a right singular vector of that norm
    and B carries the singular values; otherwise they are split evenly
    (B = U sqrt(S), A = sqrt(S) V^T). Components beyond the numerical rank get a
    zero B column (B A is unchanged) and, with ``a_row_norm``, a non-zero A row.
    """
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    keep = min(rank, len(s))
    live = int(np.sum(s[:keep] > s[0] * RANK_TOLERANCE)) if keep and s[0] > 0 else 0
    b = np.zeros((matrix.shape[0], rank), dtype=np.float32)
    a = np.zeros((rank, matrix.shape[1]), dtype=np.float32)
    if a_row_norm > 0:
        b[:, :live] = u[:, :live] * (s[:live] / a_row_norm)
        a[:keep] = a_row_norm * vt[:keep]
    else:
        root = np.sqrt(s[:live])
        b[:, :live] = u[:, :live] * root
        a[:live] = root[:, None] * vt[:live]
    return b, a


def rms_row_norm(a_mean: np.ndarray) -> float:
    """The root-mean-square row norm of an A factor (rank, in)."""
    return float(np.sqrt(np.mean(np.sum(np.asarray(a_mean, dtype=np.float64) ** 2, axis=1))))


class ExactAggregator:
    """Weighted mean of every layer's B_i A_i, re-factorised to rank r; the rest averaged."""

    def __init__(self, residual: str = "carry") -> None:
        if residual not in RESIDUAL_MODES:
            raise ValueError(f"unknown residual mode {residual!r}: use one of {', '.join(RESIDUAL_MODES)}")
        self.residual = residual
        self.residuals: dict[str, np.ndarray] = {}
        self.last_residual_norms: dict[str, float] = {}
        self.last_relative_residual = 0.0

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Arrays:
        """Return rank-r factors of each layer's mean product and the averaged other tensors."""
        names = common_names(updates)
        pairs = lora_pairs(names)
        weights = example_weights(updates)
        paired = {n for pair in pairs for n in pair}
        result = combine_tensors(updates, [n for n in names if n not in paired], weighted_mean)
        residual_sq, target_sq = 0.0, 0.0
        self.last_residual_norms = {}
        for a_name, b_name in pairs:
            a_stack, b_stack = stacked(updates, a_name), stacked(updates, b_name)
            if a_stack.ndim != 3 or b_stack.ndim != 3 or a_stack.shape[1] != b_stack.shape[2]:
                raise ValueError(
                    f"{a_name} {a_stack.shape[1:]} and {b_name} {b_stack.shape[1:]} are not "
                    "LoRA factors of one rank: A must be (r, in) and B (out, r)"
                )
            key = residual_name(a_name)
            target = mean_product(b_stack, a_stack, weights)
            carried = self.residuals.get(key)
            if self.residual == "carry" and carried is not None and carried.shape == target.shape:
                target += carried
            a_mean = weighted_mean(a_stack, weights)
            if not np.any(target):  # no LoRA training yet: keep the (shared) factors, as FedAvg would
                result[b_name], result[a_name] = weighted_mean(b_stack, weights), a_mean
            else:
                result[b_name], result[a_name] = truncated_factors(target, a_stack.shape[1], rms_row_norm(a_mean))
            rest = target - result[b_name].astype(np.float64) @ result[a_name].astype(np.float64)
            if self.residual == "carry":
                self.residuals[key] = rest
            self.last_residual_norms[key] = float(np.linalg.norm(rest))
            residual_sq += self.last_residual_norms[key] ** 2
            target_sq += float(np.sum(target**2))
        self.last_relative_residual = float(np.sqrt(residual_sq / target_sq)) if target_sq > 0 else 0.0
        return result

    def state_dict(self) -> Arrays:
        """The carried residuals, for a checkpoint (keys ``residual/<layer>``)."""
        return {STATE_PREFIX + k: v.copy() for k, v in self.residuals.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the residuals saved by :meth:`state_dict`."""
        self.residuals = {
            k[len(STATE_PREFIX) :]: np.asarray(v, dtype=np.float64)
            for k, v in state.items()
            if k.startswith(STATE_PREFIX)
        }
