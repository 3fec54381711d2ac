"""What the server puts on the wire each round, and how it reads the sites' replies back.

Downlink: the global tensors the sites train (all of them, or under FFA-LoRA
all but the frozen A factors, which every site already holds at their seeded
value), encoded by the run's codec (:mod:`strategies.compression`).

Uplink: a site encodes its trained tensors against the arrays it decoded from
the message (or as they are, when the message carried none: round 1); the
server decodes them against the same decoded arrays, which it reproduces as
``compression.round_trip(what it sent)``. With codec ``none`` nothing is
encoded or decoded, so a reply's dtypes reach the validator untouched.

The client side of the same convention is ``client/update_codec.py``. No torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.aggregation import Aggregator, Arrays, uploaded_names
from strategies.compression import Compression


class WireFormat:
    """Selects and encodes the downlink; decodes replies against what was sent in their round."""

    def __init__(self, aggregator: Aggregator, compression: Compression | None = None) -> None:
        self.aggregator = aggregator
        self.compression = compression or Compression("none")
        self._sent: dict[int, Arrays] = {}  # round -> the train arrays as the sites decode them

    @property
    def codec(self) -> str:
        """The codec name (none, fp16, int8)."""
        return self.compression.codec

    def downlink(self, server_round: int, arrays: Mapping[str, np.ndarray], kind: str = "train") -> Arrays:
        """The encoded arrays to send to every site for ``kind`` ("train" or "evaluate") in ``server_round``."""
        names = uploaded_names(self.aggregator, arrays) if arrays else []
        selected = {name: np.asarray(arrays[name]) for name in names}
        if kind == "train":
            self._sent = {server_round: self.compression.round_trip(selected) if self.codec != "none" else selected}
        if self.codec == "none":
            return selected
        return self.compression.encode(selected)

    def decode_uplink(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> Arrays:
        """A reply's arrays as float32 tensors; raises ValueError when they cannot be decoded."""
        if self.codec == "none":
            return dict(arrays)
        reference = self._sent.get(server_round) or None
        return self.compression.decode(arrays, reference)
