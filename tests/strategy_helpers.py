"""Tiny LoRA-shaped arrays with real peft names, for the strategy tests."""

from __future__ import annotations

import numpy as np

from strategies.aggregation import Arrays

HEAD_W = "base_model.model.classifier.modules_to_save.default.weight"
HEAD_B = "base_model.model.classifier.modules_to_save.default.bias"


def lora_name(layer: int, module: str, factor: str) -> str:
    """The peft name of one LoRA factor (``factor`` is "A" or "B")."""
    return f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}.lora_{factor}.default.weight"


def random_adapter(
    rng: np.random.Generator, layers: int = 2, out: int = 12, inp: int = 10, rank: int = 4, classes: int = 3
) -> Arrays:
    """Random float32 LoRA factors on query and value of ``layers`` layers, plus a head."""
    arrays: Arrays = {}
    for layer in range(layers):
        for module in ("query", "value"):
            arrays[lora_name(layer, module, "A")] = rng.standard_normal((rank, inp)).astype(np.float32)
            arrays[lora_name(layer, module, "B")] = rng.standard_normal((out, rank)).astype(np.float32)
    arrays[HEAD_W] = rng.standard_normal((classes, out)).astype(np.float32)
    arrays[HEAD_B] = rng.standard_normal(classes).astype(np.float32)
    return arrays


def weighted_sum(values: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """sum_i (n_i / sum n) values_i in float64, by an explicit loop."""
    total = float(sum(counts))
    result = np.zeros(np.shape(values[0]), dtype=np.float64)
    for value, count in zip(values, counts):
        result += (count / total) * np.asarray(value, dtype=np.float64)
    return result


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| (Frobenius)."""
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected) / np.linalg.norm(expected))
