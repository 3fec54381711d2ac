"""The mean-pooled classifier against a one-example reference; export description and loader errors."""

from __future__ import annotations

import pytest
import torch

from fedcl.pooled_classifier import MeanPooledClassifier


def _tiny_encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    ).eval()


def test_logits_equal_the_normalised_mean_of_each_unpadded_example_and_ignore_padding():
    model = MeanPooledClassifier(_tiny_encoder(), num_labels=3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        for row in range(2):
            length = int(mask[row].sum())
            hidden = model.encoder(input_ids=ids[row : row + 1, :length]).last_hidden_state[0]  # no padding at all
            pooled = hidden.mean(dim=0)
            reference = model.classifier(pooled / pooled.norm())
            torch.testing.assert_close(batched[row], reference, rtol=1e-5, atol=1e-6)


def test_labels_give_the_mean_cross_entropy_and_hidden_states_pass_through():
    model = MeanPooledClassifier(_tiny_encoder(), num_labels=3).eval()
    ids, labels = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([2, 0])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert len(out.hidden_states) == 2 and out.hidden_states[-1].shape == (2, 3, 16)


def test_one_label_is_refused():
    with pytest.raises(ValueError, match="two or more"):
        MeanPooledClassifier(_tiny_encoder(), num_labels=1)


def test_pooling_key_is_checked():
    from fedcl.run_config import ConfigError, parse_run_config

    with pytest.raises(ConfigError, match="'pooling' = 'cls'"):
        parse_run_config({"pooling": "cls"})


def test_loading_a_folder_without_the_description_names_what_to_give(tmp_path):
    from fedcl.exported_adapter import load_exported_model

    with pytest.raises(ValueError, match="fedcl-model.json is missing"):
        load_exported_model(tmp_path)
