"""The site's feature cache: what it returns is what the model computes; anything it depends on changing misses."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from client import phases
from client.feature_store import (
    FEATURE_CACHE_ENV,
    FOLDER,
    FROZEN,
    HEAD_INPUTS,
    attach_feature_store,
    feature_cache_enabled,
    forget_feature_stores,
    stored_features,
    stored_head_inputs,
)
from client.head_features import adapter_fingerprint, head_inputs
from client.nearest_class_mean import mean_pooled_features
from client.site_runtime import SiteRuntime, site_runtime
from client.site_state import open_state
from fedcl.model_factory import set_trainable_arrays
from fedcl.run_config import ConfigError

LABELS = ("business", "sport", "tech")
TEXTS = [
    ("markets fell sharply today", "business"),
    ("the match ended in a draw", "sport"),
    ("a new phone was released", "tech"),
    ("shares rallied after the report", "business"),
    ("the striker scored twice", "sport"),
    ("chip makers ship faster processors", "tech"),
    ("the bank raised its rates", "business"),
    ("the final went to penalties", "sport"),
]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture()
def site(tmp_path: Path, tiny_model_dir: Path) -> dict:
    """A site's files (its records, its state directory) and its configs, with the tiny model."""
    forget_feature_stores()
    phases.forget_cached_features()
    data = tmp_path / "records"
    write_csv(data / "train.csv", TEXTS[:6])
    write_csv(data / "test.csv", TEXTS[6:])
    state = tmp_path / "state"
    node = {
        "site-name": "clinic",
        "data-path": str(data / "train.csv"),
        "test-path": str(data / "test.csv"),
        "state-dir": str(state),
    }
    run = {"model": str(tiny_model_dir), "labels": ",".join(LABELS), "max-length": 16, "seed": 5}
    yield {"root": tmp_path, "data": data, "state": state, "node": node, "run": run}
    forget_feature_stores()
    phases.forget_cached_features()


def runtime_of(site: dict, **run: object) -> SiteRuntime:
    """The site's runtime as one message builds it, with its store attached (as the ClientApp does)."""
    runtime = site_runtime({**site["run"], **run}, site["node"], environ={})
    set_trainable_arrays(runtime.adapter.model, runtime.adapter.initial_state)
    attach_feature_store(runtime, site["node"], open_state(site["state"]), environ={})
    return runtime


def counted(compute):
    """``compute`` with a call counter (a miss calls it, a hit does not)."""
    calls = []

    def call():
        calls.append(1)
        return compute()

    call.calls = calls
    return call


def reference_head_inputs(runtime: SiteRuntime, split: str = "train") -> torch.Tensor:
    data = runtime.data.train if split == "train" else runtime.data.test
    return head_inputs(runtime.adapter.model, data, batch_size=4)


def head_inputs_via_store(runtime: SiteRuntime, split: str = "train"):
    compute = counted(lambda: reference_head_inputs(runtime, split))
    features = stored_head_inputs(runtime, split, adapter_fingerprint(runtime.adapter.model), compute)
    return features, len(compute.calls)


def non_identity_adapter(runtime: SiteRuntime) -> SiteRuntime:
    """Install LoRA factors with B off zero (seeded), so that the head inputs depend on the adapter."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in runtime.adapter.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return runtime


def test_the_cache_returns_exactly_what_the_model_computes(site):
    runtime = non_identity_adapter(runtime_of(site))
    expected = reference_head_inputs(runtime)
    first, calls_first = head_inputs_via_store(runtime)
    again, calls_again = head_inputs_via_store(non_identity_adapter(runtime_of(site)))  # a new message
    assert (calls_first, calls_again) == (1, 0)
    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert again.dtype == expected.dtype and again.device == expected.device
    assert not torch.equal(expected, reference_head_inputs(runtime_of(site)))  # the adapter mattered


def test_frozen_features_are_cached_exactly(site):
    runtime = runtime_of(site)
    data = runtime.data.test
    expected = mean_pooled_features(runtime.adapter.model, data.inputs, batch_size=4)
    first = counted(lambda: mean_pooled_features(runtime.adapter.model, data.inputs, batch_size=4))
    second = counted(lambda: pytest.fail("a hit must not recompute"))
    np.testing.assert_array_equal(stored_features(runtime, FROZEN, "test", "frozen", first), expected)
    np.testing.assert_array_equal(stored_features(runtime_of(site), FROZEN, "test", "frozen", second), expected)
    assert (len(first.calls), len(second.calls)) == (1, 0)


def test_the_cache_lives_in_the_state_directory_only(site):
    before = {p for p in site["root"].rglob("*") if p.is_file()}
    runtime = runtime_of(site)
    head_inputs_via_store(runtime, "train")
    head_inputs_via_store(runtime, "test")
    written = {p for p in site["root"].rglob("*") if p.is_file()} - before
    cache = site["state"] / FOLDER
    assert {p.name for p in written if p.parent == cache} == {f"{HEAD_INPUTS}-train.npz", f"{HEAD_INPUTS}-test.npz"}
    assert all(p.resolve().is_relative_to(site["state"].resolve()) for p in written)


def test_changed_records_miss(site):
    head_inputs_via_store(runtime_of(site))
    write_csv(site["data"] / "train.csv", [*TEXTS[:5], ("a brand new record about tech", "tech")])
    runtime = runtime_of(site)
    features, calls = head_inputs_via_store(runtime)
    assert calls == 1
    assert torch.equal(features, reference_head_inputs(runtime))


def test_a_changed_reading_of_the_same_files_misses(site):
    head_inputs_via_store(runtime_of(site))
    site["node"] = {**site["node"], "test-path": "", "test-fraction": 0.5}  # the same file, split another way
    _, calls = head_inputs_via_store(runtime_of(site))
    assert calls == 1


def test_a_changed_max_length_misses(site):
    head_inputs_via_store(runtime_of(site))
    runtime = runtime_of(site, **{"max-length": 8})
    features, calls = head_inputs_via_store(runtime)
    assert calls == 1
    assert torch.equal(features, reference_head_inputs(runtime))


def test_a_changed_model_misses(site, tiny_model_dir):
    copy = shutil.copytree(tiny_model_dir, site["root"] / "model")
    head_inputs_via_store(runtime_of(site, model=str(copy)))
    _, calls = head_inputs_via_store(runtime_of(site, model=str(copy)))
    assert calls == 0
    weights = next(copy.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the weights file replaced
    _, calls = head_inputs_via_store(runtime_of(site, model=str(copy)))
    assert calls == 1
    _, calls = head_inputs_via_store(runtime_of(site))  # another model folder altogether
    assert calls == 1


def test_a_changed_adapter_misses(site):
    runtime = runtime_of(site)
    head_inputs_via_store(runtime)
    with torch.no_grad():
        next(p for n, p in runtime.adapter.model.named_parameters() if "lora_B" in n).add_(0.1)
    features, calls = head_inputs_via_store(runtime)
    assert calls == 1
    assert torch.equal(features, reference_head_inputs(runtime))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip-a-byte", "other-features"])
def test_a_damaged_file_is_recomputed_and_replaced(site, damage):
    runtime = runtime_of(site)
    expected = reference_head_inputs(runtime)
    head_inputs_via_store(runtime)
    path = site["state"] / FOLDER / f"{HEAD_INPUTS}-train.npz"
    payload = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(payload[: len(payload) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a cache" * 50)
    elif damage == "flip-a-byte":  # inside the stored features: the zip's CRC or the checksum catches it
        raw = expected.numpy().tobytes()
        at = payload.index(raw[:64]) + 32
        path.write_bytes(payload[:at] + bytes([payload[at] ^ 0xFF]) + payload[at + 1 :])
    else:  # the right key, other numbers: the checksum no longer matches
        with np.load(path) as saved:
            arrays = {name: saved[name] for name in saved.files}
        arrays["features"] = arrays["features"] + 1.0
        np.savez(path.with_suffix(""), **arrays)  # np.savez adds the .npz suffix back
    features, calls = head_inputs_via_store(runtime_of(site))
    assert calls == 1
    assert torch.equal(features, expected)
    _, calls = head_inputs_via_store(runtime_of(site))  # replaced by a good file
    assert calls == 0


def test_switched_off_the_site_keeps_nothing_on_disk(site):
    site["node"] = {**site["node"], "feature-cache": False}
    runtime = runtime_of(site)
    calls = [head_inputs_via_store(runtime)[1] for _ in range(2)]
    assert calls == [1, 1]
    assert not (site["state"] / FOLDER).exists()


def test_the_switch(monkeypatch):
    assert feature_cache_enabled({}, environ={}) is True
    assert feature_cache_enabled({"feature-cache": False}, environ={}) is False
    assert feature_cache_enabled({"feature-cache": "true"}, environ={FEATURE_CACHE_ENV: "0"}) is True
    assert feature_cache_enabled({}, environ={FEATURE_CACHE_ENV: "0"}) is False
    with pytest.raises(ConfigError, match="feature-cache"):
        feature_cache_enabled({"feature-cache": "sometimes"}, environ={})
    with pytest.raises(ConfigError, match=FEATURE_CACHE_ENV):
        feature_cache_enabled({}, environ={FEATURE_CACHE_ENV: "maybe"})


def test_a_store_serves_only_the_records_it_was_attached_for(site):
    runtime = runtime_of(site)
    head_inputs_via_store(runtime)
    other = site_runtime({**site["run"], "max-length": 12}, site["node"], environ={})  # never attached
    set_trainable_arrays(other.adapter.model, other.adapter.initial_state)
    _, calls = head_inputs_via_store(other)
    assert calls == 1


def test_a_new_process_reads_the_phases_features_from_the_state_directory(site, monkeypatch):
    runtime = non_identity_adapter(runtime_of(site))
    head = phases.cached_head_inputs(runtime, "train")
    frozen = phases.frozen_features(runtime, "test")
    phases.forget_cached_features()  # what the next message's fresh process starts with

    def no_embedding(*_args, **_kwargs):
        raise AssertionError("the features were embedded again instead of read from the site's store")

    monkeypatch.setattr(phases, "head_inputs", no_embedding)
    monkeypatch.setattr(phases, "mean_pooled_features", no_embedding)
    runtime = non_identity_adapter(runtime_of(site))
    assert torch.equal(phases.cached_head_inputs(runtime, "train"), head)
    np.testing.assert_array_equal(phases.frozen_features(runtime, "test"), frozen)
