"""fp16 and int8 encodings: round-trip error bounds and serialised byte counts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from strategy_helpers import random_adapter

from strategies.compression import SCALE_SUFFIX, Compression, decode_arrays, encode_arrays, serialized_bytes


def _npy_bytes(value: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getbuffer().nbytes


def test_int8_error_is_at_most_half_a_step() -> None:
    arrays = random_adapter(np.random.default_rng(0))
    decoded = decode_arrays(encode_arrays(arrays, "int8"))
    for name, value in arrays.items():
        scale = float(np.max(np.abs(value))) / 127
        assert np.max(np.abs(decoded[name] - value)) <= scale / 2 * (1 + 1e-6) + 1e-7
        assert decoded[name].dtype == np.float32


def test_fp16_relative_error_and_reference_mode() -> None:
    rng = np.random.default_rng(1)
    arrays = random_adapter(rng)
    decoded = Compression("fp16").round_trip(arrays)
    for name, value in arrays.items():
        assert np.max(np.abs(decoded[name] - value) / np.abs(value)) <= 2.0**-11
    updated = {n: v + np.float32(1e-3) * rng.standard_normal(v.shape).astype(np.float32) for n, v in arrays.items()}
    codec = Compression("int8")
    with_reference = codec.round_trip(updated, reference=arrays)
    for name, value in updated.items():
        scale = float(np.max(np.abs(value - arrays[name]))) / 127  # the step of the difference: ~1e-3 / 30
        assert np.max(np.abs(with_reference[name] - value)) <= scale / 2 + 1e-6


def test_byte_counts_are_the_serialised_message_and_shrink_as_expected() -> None:
    arrays = random_adapter(np.random.default_rng(2), layers=2, out=64, inp=64, rank=8)
    plain = serialized_bytes(encode_arrays(arrays, "none"))
    assert plain == sum(_npy_bytes(v) + len(n) for n, v in arrays.items())
    fp16 = serialized_bytes(encode_arrays(arrays, "fp16"))
    int8_encoded = encode_arrays(arrays, "int8")
    assert set(int8_encoded) == set(arrays) | {n + SCALE_SUFFIX for n in arrays}
    int8 = serialized_bytes(int8_encoded)
    data = sum(v.nbytes for v in arrays.values())
    print(f"float32 {plain} B, fp16 {fp16} B ({fp16 / plain:.3f}), int8 {int8} B ({int8 / plain:.3f})")
    assert fp16 - sum(_npy_bytes(v.astype(np.float16)) + len(n) for n, v in arrays.items()) == 0
    assert plain - fp16 == data // 2  # headers and names stay, the data halves
    assert int8 == sum(
        _npy_bytes(v.astype(np.int8)) + len(n) + _npy_bytes(np.float32(0).reshape(())) + len(n + SCALE_SUFFIX)
        for n, v in arrays.items()
    )


def test_refusals_name_the_fix() -> None:
    with pytest.raises(ValueError, match="use one of"):
        Compression("int4")
    with pytest.raises(ValueError, match="non-finite"):
        encode_arrays({"w": np.array([np.nan], np.float32)}, "int8")
    with pytest.raises(ValueError, match="float16 range"):
        encode_arrays({"w": np.array([1e5], np.float32)}, "fp16")
    with pytest.raises(ValueError, match="scales"):
        decode_arrays({"w": np.zeros(2, np.int8)})
    zeros = decode_arrays(encode_arrays({"w": np.zeros(3, np.float32)}, "int8"))
    np.testing.assert_array_equal(zeros["w"], np.zeros(3))
