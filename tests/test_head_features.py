"""Cached head inputs: the head applied to them gives the model's own logits."""

import dataclasses

import numpy as np
import torch

from client.head_features import adapter_fingerprint, evaluate_head, head_inputs, head_module
from client.local_training import encode, evaluate
from fedcl.model_factory import load_adapter_model
from fedcl.run_config import RunConfig

TEXTS = [
    "markets fell sharply",
    "the match ended in a draw",
    "new phone released",
    "election results are in",
    "film wins award",
    "shares rallied",
]
LABELS = np.array([0, 3, 4, 2, 1, 0])


def test_head_on_cached_inputs_equals_the_full_model(tiny_model_dir):
    config = dataclasses.replace(RunConfig(model=str(tiny_model_dir), max_length=16), seed=3)
    adapter = load_adapter_model(config, num_labels=5)
    with torch.no_grad():  # a non-identity adapter: B off zero
        for name, param in adapter.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
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


def test_fingerprint_follows_lora_tensors_not_the_head(tiny_model_dir):
    model = load_adapter_model(RunConfig(model=str(tiny_model_dir), max_length=16, seed=9), num_labels=5).model
    params = dict(model.named_parameters())
    before = adapter_fingerprint(model)
    with torch.no_grad():
        next(p for n, p in params.items() if "modules_to_save" in n).add_(1.0)
    assert adapter_fingerprint(model) == before  # the head does not change the head's inputs
    with torch.no_grad():
        next(p for n, p in params.items() if "lora_B" in n).add_(1e-3)
    assert adapter_fingerprint(model) != before
