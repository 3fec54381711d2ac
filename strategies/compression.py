"""Lossy encodings of a dict of arrays for the wire, both directions: fp16 and int8.

- ``"none"``: float32 as it is.
- ``"fp16"``: each tensor cast to float16 (half the bytes; relative error
  <= 2^-11 per value; values beyond +-65504 are refused rather than sent as inf).
- ``"int8"``: symmetric per-tensor quantisation, q = round(x / s) with
  s = max|x| / 127, sent as int8 plus one float32 scale per tensor under the
  name ``<name>.int8-scale`` (a quarter of the bytes plus ~140 B per tensor);
  the absolute error per value is at most s / 2.

Decoding is self-describing (by dtype and the scale entries) and always gives
float32. With ``reference`` both sides encode and decode the difference from
arrays they both hold (for the uplink: the global arrays as the client decoded
them), which makes the error proportional to the update instead of to the
weights; the server must then add the same decoded arrays it sent, not its
own float32 copy. Byte counts are those of the serialised message:
``flwr.app.ArrayRecord(...).count_bytes()``, i.e. every array's serialised
numpy bytes (data plus its .npy header) plus the length of its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.aggregation import Arrays

CODECS = ("none", "fp16", "int8")
SCALE_SUFFIX = ".int8-scale"
FP16_MAX = float(np.finfo(np.float16).max)


def quantise_int8(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric per-tensor int8 quantisation of ``x``: (q, scale) with x ~ q * scale."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    scale = np.float32(peak / 127.0)
    if scale == 0:
        return np.zeros(x.shape, dtype=np.int8), scale
    q = np.rint(x.astype(np.float64) / float(scale))
    return np.clip(q, -127, 127).astype(np.int8), scale


def _difference(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> Arrays:
    if reference is None:
        return {n: np.asarray(v, dtype=np.float32) for n, v in arrays.items()}
    missing = [n for n in arrays if n not in reference]
    if missing:
        raise ValueError(f"no reference for {missing[:3]}: pass the arrays both sides hold, or reference=None")
    return {n: np.asarray(v, dtype=np.float32) - np.asarray(reference[n], dtype=np.float32) for n, v in arrays.items()}


def encode_arrays(
    arrays: Mapping[str, np.ndarray], codec: str, reference: Mapping[str, np.ndarray] | None = None
) -> Arrays:
    """``arrays`` (minus ``reference`` when given) encoded by ``codec`` for an ArrayRecord."""
    if codec not in CODECS:
        raise ValueError(f"unknown compression {codec!r}: use one of {', '.join(CODECS)}")
    clashing = [n for n in arrays if n.endswith(SCALE_SUFFIX)]
    if clashing:
        raise ValueError(f"tensor names ending in {SCALE_SUFFIX!r} are reserved for int8 scales: rename {clashing[:3]}")
    values = _difference(arrays, reference)
    for name, value in values.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{name} has non-finite values: only finite arrays can be encoded")
    if codec == "none":
        return values
    if codec == "fp16":
        too_large = [n for n, v in values.items() if v.size and float(np.max(np.abs(v))) > FP16_MAX]
        if too_large:
            raise ValueError(f"{too_large[:3]} exceed the float16 range (+-65504): use int8 or none")
        return {n: v.astype(np.float16) for n, v in values.items()}
    encoded: Arrays = {}
    for name, value in values.items():
        encoded[name], scale = quantise_int8(value)
        encoded[name + SCALE_SUFFIX] = np.array(scale, dtype=np.float32)
    return encoded


def decode_arrays(encoded: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None) -> Arrays:
    """float32 arrays from what :func:`encode_arrays` produced (plus ``reference`` when it was used)."""
    decoded: Arrays = {}
    for name, value in encoded.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        value = np.asarray(value)
        if value.dtype == np.int8:
            scale = encoded.get(name + SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"int8 tensor {name} has no {name + SCALE_SUFFIX}: send the scales with the tensors")
            decoded[name] = value.astype(np.float32) * np.float32(scale)
        else:
            decoded[name] = value.astype(np.float32)
    if reference is not None:
        for name in decoded:
            if name not in reference:
                raise ValueError(f"no reference for {name}: decode with the arrays the encoder used")
            decoded[name] = decoded[name] + np.asarray(reference[name], dtype=np.float32)
    return decoded


def serialized_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of ``arrays`` in a Flower message: ``ArrayRecord.count_bytes()`` (npy data + headers + names)."""
    return ArrayRecord({n: Array(np.ascontiguousarray(v)) for n, v in arrays.items()}).count_bytes()


@dataclass(frozen=True)
class Compression:
    """One codec, applied the same way by server (downlink) and client (uplink)."""

    codec: str = "none"

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"unknown compression {self.codec!r}: use one of {', '.join(CODECS)}")

    def encode(self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None) -> Arrays:
        """Encode ``arrays`` (minus ``reference``) for a message."""
        return encode_arrays(arrays, self.codec, reference)

    def decode(self, encoded: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None) -> Arrays:
        """Decode a message's arrays to float32 (plus ``reference``)."""
        return decode_arrays(encoded, reference)

    def round_trip(self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None) -> Arrays:
        """What the receiver will hold after ``arrays`` went through this codec."""
        return decode_arrays(encode_arrays(arrays, self.codec, reference), reference)
