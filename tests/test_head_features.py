"""Cached head inputs: the head applied to them gives the model's own logits."""

import dataclasses

import numpy as np
import torch

from client.head_features import adapter_is_identity, evaluate_head, head_inputs, head_module
from client.local_training import encode, evaluate
from fedcl.model_factory import load_adapter_model, trainable_arrays
from fedcl.run_config import RunConfig

TEXTS = ["markets fell sharply", "the match ended in a draw", "new phone released", "election results are in",
         "film wins award", "shares rallied"]
LABELS = np.array([0, 3, 4, 2, 1, 0])


def test_head_on_cached_inputs_equals_the_full_model(tiny_model_dir):
    config = dataclasses.replace(RunConfig(model=str(tiny_model_dir), max_length=16), seed=3)
    adapter = load_adapter_model(config, num_labels=5)
    assert adapter_is_identity(adapter.initial_state)
    data = encode(adapter.tokenizer, TEXTS, LABELS, config.max_length)
    features = head_inputs(adapter.model, data, batch_size=4)
    assert features.shape == (len(TEXTS), 32)
    with torch.no_grad():
        expected = adapter.model(**data.inputs).logits
    torch.testing.assert_close(head_module(adapter.model)(features), expected, rtol=1e-5, atol=1e-5)
    cached = evaluate_head(head_module(adapter.model), features, data.labels)
    full = evaluate(adapter.model, data, batch_size=4)
    assert cached.accuracy == full.accuracy
    assert abs(cached.loss - full.loss) < 1e-5


def test_identity_check_sees_a_nonzero_b_factor(tiny_model_dir):
    arrays = dict(load_adapter_model(RunConfig(model=str(tiny_model_dir), max_length=16), num_labels=5).initial_state)
    name = next(k for k in arrays if "lora_B" in k)
    arrays[name] = arrays[name] + 1e-3
    assert not adapter_is_identity(arrays)
