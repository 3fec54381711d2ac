"""DP-SGD with Opacus on a tiny LoRA BERT: per-sample gradients, equivalence to plain SGD, reuse, extra gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from client.dp_training import per_sample_gradient_hooks, train_private, train_private_features
from client.local_training import Encoded
from client.mechanisms import UNBOUNDED_CLIP, SgdMechanism, sgd_mechanism
from client.secure_noise import NoiseSource
from fedcl.model_factory import lora_settings
from fedcl.run_config import RunConfig

VOCAB, LENGTH, LABELS = 100, 12, 3


def tiny_model(seed: int = 0, pooling: str = "model") -> torch.nn.Module:
    """A 2-layer BERT (hidden 32) with fedcl's LoRA settings, in eval mode like ``from_pretrained``.

    ``pooling = "model"``: BERT's own classifier (pooler); ``"mean"``: fedcl's mean-pooled classifier.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from fedcl.pooled_classifier import MeanPooledClassifier

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,  # deterministic forward for comparisons
    )
    base = (
        BertForSequenceClassification(config) if pooling == "model" else MeanPooledClassifier(BertModel(config), LABELS)
    )
    model = get_peft_model(base, LoraConfig(**lora_settings(RunConfig())))
    with torch.no_grad():  # LoRA B starts at zero, which makes every LoRA A gradient zero: move it off zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return model.eval()


def tiny_data(records: int = 24, seed: int = 1) -> Encoded:
    """Random token sequences of varied length (right padding), random labels."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, LENGTH + 1, (records,), generator=generator)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (records, LENGTH), generator=generator) * mask
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return Encoded(inputs, torch.randint(0, LABELS, (records,), generator=generator))


def mean_loss(model: torch.nn.Module, data: Encoded, index: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the rows, with the all-padding columns dropped (as the trainers do)."""
    rows = data.rows(index)
    longest = int(rows["attention_mask"].sum(dim=1).max())
    logits = model(**{k: v[:, :longest] for k, v in rows.items()}).logits
    return F.cross_entropy(logits, data.labels[index])


def mechanism(sigma: float, expected_batch: int, records: int, steps: int, clip: float = 1.0) -> SgdMechanism:
    """The mechanism of ``steps`` Poisson batches of expected size ``expected_batch`` over ``records``."""
    return sgd_mechanism(sigma, expected_batch, records, steps, clip)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_per_sample_gradients_match_loop(model: torch.nn.Module, data: Encoded) -> None:
    index = torch.tensor([0, 3, 5, 8, 13])
    with per_sample_gradient_hooks(model) as named:
        mean_loss(model, data, index).backward()
        opacus = {name: p.grad_sample.detach().clone() for name, p in named.items()}
    model.train()
    for row, i in enumerate(index):
        grads = torch.autograd.grad(mean_loss(model, data, i.view(1)), list(named.values()))
        for (name, _), grad in zip(named.items(), grads):
            torch.testing.assert_close(opacus[name][row], grad, rtol=1e-4, atol=1e-6, msg=f"{name}, example {row}")
    model.eval()
    kinds = {"lora_A", "lora_B", "modules_to_save.default.weight", "modules_to_save.default.bias"}
    assert all(any(kind in name for name in opacus) for kind in kinds), sorted(opacus)
    assert all(g.abs().sum() > 0 for g in opacus.values())  # every comparison is non-trivial


def fingerprint(model: torch.nn.Module) -> dict[str, object]:
    """Everything Opacus could leave on a model: attributes, hooks, modes, gradients."""
    seen: dict[str, object] = {}
    for name, module in model.named_modules():
        seen[f"module {name}"] = (
            sorted(module.__dict__),
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            len(module._backward_hooks),
            module._is_full_backward_hook,
            module.training,
        )
    for name, param in model.named_parameters():
        seen[f"param {name}"] = (sorted(param.__dict__), param.grad is None, param.requires_grad)
    return seen


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_per_sample_gradients_of_every_trainable_tensor_match_a_one_example_loop(pooling: str) -> None:
    """The guard against peft/opacus pairs that corrupt LoRA per-sample gradients (opacus issue 820)."""
    assert_per_sample_gradients_match_loop(tiny_model(pooling=pooling), tiny_data())


def test_two_private_calls_on_one_model_leave_no_trace_and_gradients_stay_correct() -> None:
    model, data = tiny_model(), tiny_data()
    before, start = fingerprint(model), trainable(model)
    for seed in (1, 2):
        outcome = train_private(model, data, mechanism(1.0, 6, 24, 3), 0.1, NoiseSource.seeded(seed))
        assert outcome.steps == 3 and outcome.sample_rate == pytest.approx(6 / 24)
        assert fingerprint(model) == before
    assert any(not torch.equal(start[n], p) for n, p in trainable(model).items())
    assert_per_sample_gradients_match_loop(model, data)
    assert fingerprint(model) == before
    model.train()  # a model handed over in train mode comes back in train mode
    train_private(model, data, mechanism(1.0, 6, 24, 1), 0.1, NoiseSource.seeded(3))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_noise_and_unbounded_clip_equals_one_plain_step(optimizer: str) -> None:
    """Sample rate 1 (batch = all 8 records), sigma 0, huge clip: DP-SGD is the plain optimiser step."""
    data, lr = tiny_data(records=8), 0.05
    private, plain = tiny_model(), tiny_model()
    outcome = train_private(
        private, data, mechanism(0.0, 8, 8, 1, UNBOUNDED_CLIP), lr, NoiseSource.seeded(0), optimizer=optimizer
    )
    assert outcome.mean_batch_size == 8
    params = [p for p in plain.parameters() if p.requires_grad]
    step = torch.optim.AdamW(params, lr=lr) if optimizer == "adamw" else torch.optim.SGD(params, lr=lr)
    plain.train()
    mean_loss(plain, data, torch.arange(8)).backward()
    step.step()
    # Adam's first step is about lr * g / (|g| + 1e-8): float-level differences in gradients of ~1e-9 show up
    # at ~1e-6, i.e. 2e-5 of the step; SGD is compared at float precision.
    atol = 1e-6 if optimizer == "adamw" else 1e-7
    for name, value in trainable(plain).items():
        torch.testing.assert_close(trainable(private)[name], value, rtol=1e-5, atol=atol, msg=name)


def test_no_noise_and_unbounded_clip_equals_one_plain_step_for_features() -> None:
    features, labels = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 3
    private, plain = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    plain.load_state_dict(private.state_dict())
    train_private_features(
        private, features, labels, mechanism(0.0, 10, 10, 1, UNBOUNDED_CLIP), 0.3, NoiseSource.seeded(0)
    )
    F.cross_entropy(plain(features), labels).backward()
    torch.optim.SGD(plain.parameters(), lr=0.3).step()
    torch.testing.assert_close(private.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-7)


def test_extra_gradient_is_added_after_clipping_and_noise() -> None:
    """Same seed (same batch, same noise), tight clip: the extra term moves the update by exactly lr * extra."""
    data, lr = tiny_data(), 0.1
    without, with_extra = tiny_model(), tiny_model()
    extra = {name: torch.full_like(p, 0.5) for name, p in with_extra.named_parameters() if p.requires_grad}
    settings = dict(mechanism=mechanism(1.0, 6, 24, 1, clip=0.1), learning_rate=lr)
    train_private(without, data, noise=NoiseSource.seeded(7), **settings)
    calls = []

    def add_extra(named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        calls.append(sorted(named))
        return extra

    train_private(with_extra, data, noise=NoiseSource.seeded(7), extra_gradient=add_extra, **settings)
    assert calls == [sorted(extra)]
    after_without, after_with = trainable(without), trainable(with_extra)
    for name, term in extra.items():
        difference = after_with[name] - after_without[name]
        assert difference.abs().max() > 0
        torch.testing.assert_close(difference, -lr * term, rtol=1e-4, atol=1e-6, msg=name)


def test_extra_gradient_with_unknown_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown parameters"):
        train_private_features(
            torch.nn.Linear(4, 2),
            torch.randn(8, 4),
            torch.arange(8) % 2,
            mechanism(1.0, 4, 8, 1),
            0.1,
            NoiseSource.seeded(0),
            extra_gradient=lambda named: {"nope": torch.zeros(1)},
        )


def test_seeded_runs_reproduce_and_seeds_differ() -> None:
    features, labels = torch.randn(50, 5, generator=torch.Generator().manual_seed(0)), torch.arange(50) % 2
    results = []
    for noise in (NoiseSource.seeded(11), NoiseSource.seeded(11), NoiseSource.seeded(12), NoiseSource.secure()):
        head = torch.nn.Linear(5, 2)
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
        train_private_features(head, features, labels, mechanism(1.0, 10, 50, 4), 0.5, noise)
        results.append(head.weight.detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2]) and not torch.equal(results[0], results[3])


def test_empty_poisson_batches_are_noise_only_steps_that_count() -> None:
    """Expected batch 1: a third of the 30 batches are empty (seeded, so certainly some)."""
    head = torch.nn.Linear(4, 2)
    start = head.weight.detach().clone()
    outcome = train_private_features(
        head, torch.randn(1000, 4), torch.arange(1000) % 2, mechanism(1.0, 1, 1000, 30), 0.1, NoiseSource.seeded(3)
    )
    assert outcome.steps == 30
    assert torch.isfinite(head.weight).all() and not torch.equal(head.weight, start)


def test_private_linear_probe_learns_separable_features() -> None:
    """Three Gaussian clusters, 600 records, sigma 1, clip 1, batch 64: the zero-started head learns them."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 3
    labels = torch.arange(600) % 3
    features = centres[labels] + torch.randn(600, 16, generator=generator)
    features = features / features.norm(dim=1, keepdim=True)
    head = torch.nn.Linear(16, 3)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    outcome = train_private_features(
        head, features, labels, mechanism(1.0, 64, 600, 60), 0.5, NoiseSource.seeded(0), momentum=0.9
    )
    with torch.no_grad():
        accuracy = float((head(features).argmax(dim=1) == labels).float().mean())
    assert accuracy > 0.9
    assert outcome.sample_rate == pytest.approx(64 / 600) and outcome.seconds < 10


def test_zero_steps_change_nothing_and_report_zero() -> None:
    model, data = tiny_model(), tiny_data()
    before, start = fingerprint(model), trainable(model)
    outcome = train_private(model, data, mechanism(1.0, 6, 24, 0), 0.1, NoiseSource.seeded(0))
    assert outcome.steps == 0
    assert all(torch.equal(start[n], p) for n, p in trainable(model).items()) and fingerprint(model) == before


@pytest.mark.parametrize(("sigma", "clip", "fixed"), [(1.0, 1.0, True), (0.0, UNBOUNDED_CLIP, False)])
def test_private_batches_keep_the_full_padded_length_and_plain_ones_trim(
    sigma: float, clip: float, fixed: bool
) -> None:
    """Step time must not depend on the batch's longest record under DP; plain training may trim."""
    generator = torch.Generator().manual_seed(0)
    data = tiny_data(records=24)
    short = (torch.arange(LENGTH)[None, :] < 4).long().expand(24, LENGTH).clone()  # every record 4 tokens long
    data = Encoded(
        {
            "input_ids": data.inputs["input_ids"] * short,
            "attention_mask": short,
            "token_type_ids": torch.zeros_like(short),
        },
        torch.randint(0, LABELS, (24,), generator=generator),
    )
    model, widths = tiny_model(), []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    try:
        train_private(model, data, mechanism(sigma, 12, 24, 3, clip), 0.1, NoiseSource.seeded(1))
    finally:
        hook.remove()
    assert widths and set(widths) == ({LENGTH} if fixed else {4})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"momentum": 1.0}, "momentum"),
        ({"mechanism": (1.0, 0.25, 1)}, "SgdMechanism"),  # a bare ledger entry is not a mechanism
        ({"noise": 0}, "NoiseSource"),  # a seed is not a noise source
    ],
)
def test_nonsense_settings_are_rejected_before_training(change: dict, message: str) -> None:
    model = tiny_model()
    before = trainable(model)
    settings = dict(mechanism=mechanism(1.0, 6, 24, 1), learning_rate=0.1, noise=NoiseSource.seeded(0)) | change
    with pytest.raises(ValueError, match=message):
        train_private(model, tiny_data(), **settings)
    assert all(torch.equal(before[n], p) for n, p in trainable(model).items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"noise_multiplier": -1.0}, "noise multiplier"),
        ({"steps": -1}, "steps"),
        ({"nominal_records": 0}, "nominal records"),
    ],
)
def test_nonsense_mechanisms_cannot_be_built(change: dict, message: str) -> None:
    settings = dict(noise_multiplier=1.0, expected_batch=6, nominal_records=24, steps=1, max_grad_norm=1.0) | change
    with pytest.raises(ValueError, match=message):
        sgd_mechanism(**settings)
