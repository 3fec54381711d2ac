"""FedAdam and FedYogi: an adaptive server optimiser around any tensor-wise aggregator.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2. The
inner aggregator's result minus the current global arrays is the round's
pseudo-gradient Delta; per tensor and coordinate:

    m = beta1 m + (1 - beta1) Delta
    v = beta2 v + (1 - beta2) Delta^2                        (Adam)
    v = v - (1 - beta2) Delta^2 sign(v - Delta^2)            (Yogi)
    x = x + lr m / (sqrt(v) + tau)

with v starting at tau^2 and m at 0, and no bias correction (as in the paper).
A first step moves a coordinate by about lr * (1 - beta1) / sqrt(1 - beta2) =
lr (with the defaults), so lr is in weight units: LoRA entries are O(1e-2).
In round 1, when ``current`` is empty (every site started from the same
seeded initialisation the server does not hold), there is no pseudo-gradient:
the inner result is returned as it is. Tensors new to ``current`` pass through.

It composes with tensor-wise aggregators (fedavg, ffa, and their robust
combine rules). It does not compose with ``exact``, whose factors are in a new
basis every round, so their tensor-wise differences are not update directions.
Flower does not restore strategy state on resume: :meth:`state_dict` and
:meth:`load_state_dict` carry the moments through a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from strategies.aggregation import Aggregator, Arrays, SiteUpdate, uploaded_names

SERVER_OPTIMIZERS = ("adam", "yogi")


class ServerOptimizer:
    """Applies FedAdam or FedYogi to the pseudo-gradient an inner aggregator produces."""

    def __init__(
        self,
        inner: Aggregator,
        method: str = "adam",
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if method not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimiser {method!r}: use one of {', '.join(SERVER_OPTIMIZERS)}")
        if lr <= 0 or tau <= 0:
            raise ValueError(f"server lr ({lr}) and tau ({tau}) must be positive: use e.g. lr=1e-2, tau=1e-3")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"beta1 ({beta1}) and beta2 ({beta2}) must lie in [0, 1): use e.g. 0.9 and 0.99")
        self.inner, self.method, self.lr, self.beta1, self.beta2, self.tau = inner, method, lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def uploaded_names(self, names: Iterable[str]) -> list[str]:
        """The tensors a site sends back: whatever the inner aggregator needs."""
        return uploaded_names(self.inner, names)

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Arrays:
        """Return ``current`` moved by one adaptive step along the inner aggregator's pseudo-gradient."""
        target = self.inner.aggregate(current, updates)
        result = {}
        for name, value in target.items():
            if name not in current or np.shape(current[name]) != value.shape:
                result[name] = value
                continue
            x = np.asarray(current[name], dtype=np.float64)
            delta = value.astype(np.float64) - x
            m = self.beta1 * self.m.get(name, 0.0) + (1 - self.beta1) * delta
            v = self.v.get(name, np.full_like(x, self.tau**2))
            if self.method == "adam":
                v = self.beta2 * v + (1 - self.beta2) * delta**2
            else:
                v = v - (1 - self.beta2) * delta**2 * np.sign(v - delta**2)
            self.m[name], self.v[name] = m, v
            result[name] = (x + self.lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)
        return result

    def state_dict(self) -> Arrays:
        """The moments (keys ``m/<name>`` and ``v/<name>``) and the inner aggregator's state, for a checkpoint."""
        inner = getattr(self.inner, "state_dict", dict)()
        return {
            **inner,
            **{f"m/{k}": v.copy() for k, v in self.m.items()},
            **{f"v/{k}": v.copy() for k, v in self.v.items()},
        }

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.m = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in state.items() if k.startswith("v/")}
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict({k: v for k, v in state.items() if not k.startswith(("m/", "v/"))})
