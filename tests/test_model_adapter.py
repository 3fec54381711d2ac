"""Model and adapter round trip on a tiny random BERT; only LoRA and head tensors travel."""

import dataclasses

import numpy as np
import pytest
import torch

from fedcl.model_factory import load_adapter_model, resolve_model_path, set_trainable_arrays, trainable_arrays
from fedcl.run_config import ConfigError, RunConfig


def tiny_config(folder, **changes) -> RunConfig:
    return dataclasses.replace(RunConfig(model=str(folder), max_length=32), **changes)


def batch(tokenizer):
    return tokenizer(["a short text", "another one about markets"], padding=True, return_tensors="pt")


def test_only_lora_and_head_are_trainable(tiny_model_dir):
    adapter = load_adapter_model(tiny_config(tiny_model_dir), num_labels=5)
    names = adapter.trainable_names()
    assert names and all(("lora_A" in n or "lora_B" in n or "classifier" in n) for n in names)
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    assert not any("embeddings" in n or "attention.self.query.base_layer" in n for n in names)
    lora = [n for n in names if "lora_" in n]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)


def test_get_set_round_trip_gives_identical_logits(tiny_model_dir):
    source = load_adapter_model(tiny_config(tiny_model_dir, seed=1), num_labels=5)
    with torch.no_grad():  # move B off zero so the adapter changes the logits
        for param in source.model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    arrays = trainable_arrays(source.model)
    target = load_adapter_model(tiny_config(tiny_model_dir, seed=2), num_labels=5)
    inputs = batch(source.tokenizer)
    source.model.eval()
    target.model.eval()
    with torch.no_grad():
        before = target.model(**inputs).logits.clone()
        set_trainable_arrays(target.model, arrays)
        after = target.model(**inputs).logits
        expected = source.model(**inputs).logits
    assert not torch.allclose(before, expected)
    assert torch.equal(after, expected)


def test_same_seed_gives_the_same_initial_adapter_on_every_site(tiny_model_dir, monkeypatch):
    first = load_adapter_model(tiny_config(tiny_model_dir, seed=5), num_labels=3).initial_state
    from fedcl.worker_cache import WORKER_CACHE

    WORKER_CACHE.clear("model")  # a fresh process
    second = load_adapter_model(tiny_config(tiny_model_dir, seed=5), num_labels=3).initial_state
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_mismatched_arrays_are_refused(tiny_model_dir):
    adapter = load_adapter_model(tiny_config(tiny_model_dir), num_labels=5)
    arrays = trainable_arrays(adapter.model)
    name = next(iter(arrays))
    with pytest.raises(ValueError, match="missing"):
        set_trainable_arrays(adapter.model, {k: v for k, v in arrays.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        set_trainable_arrays(adapter.model, {**arrays, name: np.zeros((1, 1), np.float32)})


def test_model_path_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'model' = './no/such/model'"):
        resolve_model_path("./no/such/model")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="not installed"):
        resolve_model_path("package:no_such_package_here")
    assert resolve_model_path("org/some-model") == "org/some-model"  # a hub id passes through


@pytest.mark.slow
def test_real_minilm_loads_offline_and_is_small_to_send():
    adapter = load_adapter_model(RunConfig(), num_labels=5)
    arrays = adapter.initial_state
    lora = sum(v.size for k, v in arrays.items() if "lora_" in k)
    assert lora == 73_728  # r=8 on query,value of 6 layers of hidden 384
    base = adapter.model.get_base_model()
    base_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" not in n)
    assert sum(v.nbytes for v in arrays.values()) < 0.01 * base_bytes
    inputs = adapter.tokenizer(["Shares rose on the stock market today."], return_tensors="pt")
    with torch.no_grad():
        assert adapter.model(**inputs).logits.shape == (1, 5)
