"""Sites compute on their device: the node-config choice, the model's placement, every compute path, Ray's share.

This machine has no GPU. Three kinds of evidence stand in for one:

- explicit ``torch.device("cpu")`` gives bit-for-bit what the default path
  gives, and a DP step equals a hand computation with the same seeded noise;
- PyTorch's ``meta`` device (shapes, no data) as a second device: an op that
  mixes a meta tensor with a CPU one raises "... not on the expected device",
  ``.numpy()`` of a meta tensor raises "can't convert meta device type tensor
  to numpy. Use Tensor.cpu()" (CUDA's message), and a path that moves its
  batches and calls ``.cpu()`` before ``.numpy()`` runs on meta until its
  first deliberate copy to the host (where meta has no data to copy): the
  negative controls below show the stand-in catches both faults;
- CUDA itself is faked only for ``site_device``'s parsing (``torch.cuda``
  functions patched).

What stays untested here: numerics on a real GPU (kernels differ from the
CPU's; run ``simulations/bench_gpu.py`` there), and the runtime-based phases
(``client/phases.py``, ``client/evaluation.py``), whose adapter fingerprint
copies the LoRA tensors to the host first: on meta they stop there; and the
move of DP-SGD's extra (EWC) gradient, since meta's in-place ``add_`` accepts
a CPU operand.
"""

from __future__ import annotations

import copy
import dataclasses
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from client.device import module_device, site_device, to_device
from client.dp_training import fixed_batch_size, padded_batch, train_private, train_private_features
from client.ewc import EwcState, anchor_arrays, estimate_importance
from client.head_features import adapter_fingerprint, evaluate_head, head_inputs, head_module
from client.local_training import Encoded, evaluate, train_plain
from client.mechanisms import SgdMechanism, sgd_mechanism
from client.nearest_class_mean import mean_pooled_features
from client.secure_noise import NoiseSource
from fedcl.model_factory import load_adapter_model, placement, trainable_arrays
from fedcl.run_config import ConfigError, RunConfig
from simulations.ray_resources import client_resources_options, default_gpus_per_site

META = torch.device("meta")
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
VOCAB, LENGTH, LABELS, DIM = 40, 10, 3, 8


# --- site_device -------------------------------------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("node_config", [{}, {"device": "auto"}, {"device": " AUTO "}, {"device": "cpu"}])
def test_auto_and_cpu_are_the_cpu_without_cuda(no_cuda: None, node_config: dict) -> None:
    assert site_device(node_config) == CPU


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_names_the_key_the_value_and_the_fix(no_cuda: None, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        site_device({"device": value})
    message = str(raised.value)
    assert "\n" not in message
    assert "node config 'device'" in message and repr(value) in message
    assert "device='cpu' or 'auto'" in message


@pytest.mark.parametrize("value", ["gpu", "mps", "cuda:x", "cuda0", "", 0, None, "cpu:0"])
def test_junk_is_refused_with_the_accepted_values(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"node config 'device' = .*not a device; use 'auto'.*'cpu'.*'cuda:N'"):
        site_device({"device": value})


def test_with_cuda_auto_and_cuda_name_the_current_device_by_index(two_gpus: None) -> None:
    assert site_device({}) == torch.device("cuda", 0)
    assert site_device({"device": "cuda"}) == torch.device("cuda", 0)
    assert site_device({"device": "cuda:1"}) == torch.device("cuda", 1)
    assert site_device({"device": "cpu"}) == CPU
    with pytest.raises(ConfigError, match=r"'cuda:2'.*sees 2 CUDA device\(s\), cuda:0 \.\. cuda:1"):
        site_device({"device": "cuda:2"})


def test_module_device_follows_the_parameters() -> None:
    assert module_device(torch.nn.Linear(2, 2)) == CPU
    assert module_device(torch.nn.Linear(2, 2, device=META)) == META
    assert module_device(torch.nn.ReLU()) == CPU  # no parameters: the CPU


# --- the stand-in device and its negative controls --------------------------------------------------------------


class ToyClassifier(torch.nn.Module):
    """Embedding -> ``query`` Linear -> tanh -> masked mean -> ``classifier``: the HF classifier interface.

    A transformer cannot run on meta (its mask code asks the host for a
    value); this model has the same calling convention (keyword inputs,
    ``.logits``, ``hidden_states``) and nothing data-dependent.
    """

    def __init__(self) -> None:
        super().__init__()
        self.config = PretrainedConfig(num_labels=LABELS)
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.query = torch.nn.Linear(DIM, DIM)
        self.classifier = torch.nn.Linear(DIM, LABELS)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = False,
        **_: Any,
    ) -> SequenceClassifierOutput:
        hidden = torch.tanh(self.query(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.classifier((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=(hidden,) if output_hidden_states else None
        )


def toy_model(seed: int = 0) -> torch.nn.Module:
    """The toy with LoRA (r=2) on ``query`` and the head trained (PEFT SEQ_CLS), B off zero, in eval mode."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        ToyClassifier(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS")
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


def toy_data(records: int = 20, seed: int = 1) -> Encoded:
    """Random token rows of varied length (right padding), random labels, on the CPU as a site keeps them."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, LENGTH + 1, (records,), generator=generator)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (records, LENGTH), generator=generator) * mask
    return Encoded(
        {"input_ids": ids, "attention_mask": mask}, torch.randint(0, LABELS, (records,), generator=generator)
    )


HOST_COPY = ("Cannot copy out of meta tensor", "cannot be called on meta tensors")


def runs_on_the_device(call: Callable[[], Any]) -> Any:
    """``call()`` with its model on meta: it must finish, or stop only at a host copy made by fedcl's own code.

    A device mismatch ("not on the expected device") or ``.numpy()`` without
    ``.cpu()`` ("can't convert meta device type tensor") propagates and fails
    the test. Returns the result, or the host-copy error.
    """
    try:
        return call()
    except (NotImplementedError, RuntimeError) as err:
        if not any(text in str(err) for text in HOST_COPY):
            raise
        ours = [frame for frame in traceback.extract_tb(err.__traceback__) if "site-packages" not in frame.filename]
        where = Path(ours[-1].filename).resolve()
        assert where.is_relative_to(REPO / "client") or where.is_relative_to(REPO / "fedcl"), ours[-1]
        return err


def test_the_stand_in_catches_a_missing_move_and_a_missing_cpu_call() -> None:
    model, data = toy_model().to(META), toy_data()
    with pytest.raises(RuntimeError, match="not on the expected device"):
        runs_on_the_device(lambda: model(**data.inputs))  # the batch was not moved
    logits = runs_on_the_device(lambda: model(**to_device(data.inputs, META)).logits)
    assert logits.device == META and logits.shape == (len(data), LABELS)
    with pytest.raises(TypeError, match="can't convert meta device type tensor to numpy"):
        runs_on_the_device(lambda: logits.numpy())  # no .cpu() first
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        logits.cpu()  # where a correct path stops on meta: its deliberate copy to the host


class CountingNoise(NoiseSource):
    """A seeded source that counts Gaussian draws (to see a DP loop reach every step on meta)."""

    def __init__(self, seed: int) -> None:
        super().__init__(torch.Generator().manual_seed(seed))
        self.draws = 0

    def gaussian(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.draws += 1
        return super().gaussian(*args, **kwargs)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(1 for p in model.parameters() if p.requires_grad)


def test_dp_lora_runs_every_step_on_the_device_and_reads_back_once_at_the_end() -> None:
    """Private (padded fixed batches, dummy rows) and plain, with an EWC-style extra gradient handed over on the CPU.

    (Meta's in-place ``add_`` does not check devices, so this runs the
    extra-gradient path without proving its move; CUDA's would refuse a CPU tensor.)
    """
    model, data = toy_model().to(META), toy_data()
    extra = {name: torch.zeros(p.shape) for name, p in model.named_parameters() if p.requires_grad}  # CPU tensors
    for sigma, clip in ((1.0, 1.0), (0.0, 1e9)):
        noise, mechanism = CountingNoise(0), sgd_mechanism(sigma, 6, 20, 3, clip)
        outcome = runs_on_the_device(
            lambda mechanism=mechanism, noise=noise: train_private(
                model, data, mechanism, 0.1, noise, extra_gradient=lambda named: extra
            )
        )
        assert isinstance(outcome, NotImplementedError)  # the loss diagnostic, copied back after the loop
        assert noise.draws == 3 * trainable_count(model)  # noise reached every parameter at every step
    assert all(p.device == META for p in model.parameters())


def test_dp_probe_runs_every_step_on_the_device() -> None:
    head = torch.nn.Linear(DIM, LABELS, device=META)
    noise = CountingNoise(1)
    outcome = runs_on_the_device(
        lambda: train_private_features(
            head, torch.randn(30, DIM), torch.arange(30) % LABELS, sgd_mechanism(1.0, 6, 30, 4, 1.0), 0.1, noise
        )
    )
    assert isinstance(outcome, NotImplementedError)
    assert noise.draws == 4 * 2


def test_head_inputs_stay_on_the_device_and_the_other_paths_stop_only_at_their_host_copy() -> None:
    model, data = toy_model().to(META), toy_data()
    features = runs_on_the_device(lambda: head_inputs(model, data, batch_size=8))
    assert features.device == META and features.shape == (len(data), DIM)
    head = head_module(model)
    batches = [(data.rows(torch.arange(5)), data.labels[:5])] * 2
    for call in (
        lambda: evaluate_head(head, features, data.labels),
        lambda: evaluate(model, data, batch_size=8),
        lambda: train_plain(model, data, steps=2, batch_size=4, learning_rate=0.1, seed=0),
        lambda: mean_pooled_features(model, data.inputs, batch_size=8),
        lambda: estimate_importance(model, batches, SgdMechanism(1.0, 0.25, 2, 1.0, 5.0), NoiseSource.seeded(0)),
        lambda: estimate_importance(
            head, [(features[:5], data.labels[:5])], SgdMechanism(0.0, 1.0, 1, 1e9, 5.0), NoiseSource.seeded(0)
        ),
    ):
        assert isinstance(runs_on_the_device(call), (NotImplementedError, RuntimeError))


def test_reply_and_state_arrays_call_cpu_before_numpy() -> None:
    from client.update_codec import reply_arrays

    model = toy_model()
    initial = trainable_arrays(model)
    model = model.to(META)
    runtime = SimpleNamespace(
        adapter=SimpleNamespace(model=model, initial_state=initial), config=RunConfig(), data=SimpleNamespace(index=0)
    )
    for call in (
        lambda: trainable_arrays(model),
        lambda: anchor_arrays(model),
        lambda: adapter_fingerprint(model),
        lambda: reply_arrays(runtime, {}),
    ):
        assert isinstance(runs_on_the_device(call), NotImplementedError)


def test_ewc_penalty_gradient_lives_on_the_parameters_device() -> None:
    model = toy_model()
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state = EwcState()
    state.consolidate(0, {k: np.ones(p.shape, np.float32) for k, p in named.items()}, anchor_arrays(model))
    gradient = state.penalty_gradient(model.to(META), ewc_lambda=2.0)
    assert set(gradient) == set(named) and all(g.device == META for g in gradient.values())


def test_dummy_rows_are_made_on_the_batch_device() -> None:
    data = toy_data(4)
    inputs = to_device(data.inputs, META)
    padded, labels = padded_batch(inputs, data.labels.to(META), 7)
    assert all(t.device == META and t.shape[0] == 7 for t in padded.values()) and labels.device == META
    rows, _ = padded_batch(torch.zeros(4, DIM, device=META), data.labels.to(META), 7)
    assert rows.device == META and rows.shape == (7, DIM)


def test_noise_is_drawn_on_the_cpu_and_moved_unchanged() -> None:
    """The same seeded source gives the same numbers whatever the device, and consumes the same draws."""
    moved, stayed = NoiseSource.seeded(3), NoiseSource.seeded(3)
    on_meta = moved.gaussian((4, 5), 2.0, META)
    on_cpu = stayed.gaussian((4, 5), 2.0, CPU)
    assert on_meta.device == META and on_meta.shape == on_cpu.shape and on_cpu.dtype == on_meta.dtype == torch.float32
    torch.testing.assert_close(moved.gaussian((6,), 1.0), stayed.gaussian((6,), 1.0), rtol=0, atol=0)
    reference = NoiseSource.seeded(3).gaussian_numpy((4, 5), 2.0).astype(np.float32)
    assert np.array_equal(on_cpu.numpy(), reference)


# --- explicit CPU: the same numbers as the default path ----------------------------------------------------------


def tiny_config(folder: Path) -> RunConfig:
    return dataclasses.replace(RunConfig(model=str(folder), max_length=16), seed=7)


def test_the_model_cache_is_per_device(tiny_model_dir: Path) -> None:
    config = tiny_config(tiny_model_dir)
    default = load_adapter_model(config, num_labels=5)
    assert load_adapter_model(config, num_labels=5, device=CPU) is default
    assert load_adapter_model(config, num_labels=5, device="cpu") is default
    assert all(p.device == CPU for p in default.model.parameters())
    elsewhere = load_adapter_model(config, num_labels=5, device=META)
    assert elsewhere is not default and elsewhere.model is not default.model
    assert all(p.device == META for p in elsewhere.model.parameters())
    assert all(p.device == CPU for p in default.model.parameters())  # the CPU model was not moved
    assert elsewhere.initial_state.keys() == default.initial_state.keys()
    assert all(np.array_equal(elsewhere.initial_state[k], default.initial_state[k]) for k in default.initial_state)
    assert load_adapter_model(config, num_labels=5, device=META) is elsewhere


def test_placement_normalises_and_refuses_cuda_without_a_gpu(no_cuda: None) -> None:
    assert placement(None) == CPU and placement("cpu") == CPU and placement(META) == META
    with pytest.raises(ValueError, match="sees no CUDA GPU; load the model with device='cpu'"):
        placement("cuda")


def test_explicit_cpu_gives_the_default_paths_numbers_bit_for_bit(tiny_model_dir: Path) -> None:
    """Features, evaluation, a seeded DP LoRA step and a private importance estimate: default vs explicit CPU."""
    adapter = load_adapter_model(tiny_config(tiny_model_dir), num_labels=5)
    default = adapter.model
    explicit = copy.deepcopy(default).to(torch.device("cpu"))
    data = Encoded(
        {k: v for k, v in toy_data(12).inputs.items()} | {"token_type_ids": torch.zeros(12, LENGTH, dtype=torch.long)},
        toy_data(12).labels,
    )
    for model in (default, explicit):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.linspace(-0.2, 0.2, param.numel()).view_as(param))
    assert torch.equal(head_inputs(default, data, 4), head_inputs(explicit, data, 4))
    assert evaluate(default, data, 4).accuracy == evaluate(explicit, data, 4).accuracy
    assert evaluate(default, data, 4).loss == evaluate(explicit, data, 4).loss
    assert np.array_equal(mean_pooled_features(default, data.inputs, 5), mean_pooled_features(explicit, data.inputs, 5))
    mechanism = sgd_mechanism(1.0, 4, 12, 2, 1.0)
    for model in (default, explicit):
        torch.manual_seed(0)  # the base model's dropout (train mode) draws from torch's global generator
        train_private(model, data, mechanism, 0.1, NoiseSource.seeded(11), optimizer="sgd", momentum=0.9)
    after = [trainable_arrays(model) for model in (default, explicit)]
    assert all(np.array_equal(after[0][k], after[1][k]) for k in after[0])
    assert not np.array_equal(after[0][next(iter(after[0]))], adapter.initial_state[next(iter(after[0]))])
    estimates = [
        estimate_importance(
            model,
            [(data.rows(torch.arange(4)), data.labels[:4])],
            SgdMechanism(1.0, 0.3, 1, 1.0, 4.0),
            NoiseSource.seeded(2),
        )
        for model in (default, explicit)
    ]
    assert all(np.array_equal(estimates[0].importance[k], estimates[1].importance[k]) for k in estimates[0].importance)
    from fedcl.model_factory import set_trainable_arrays

    set_trainable_arrays(default, adapter.initial_state)  # leave the cached model as loaded


def test_a_dp_probe_step_on_an_explicit_cpu_head_equals_the_hand_computation() -> None:
    """One step: Poisson draw, per-example gradients clipped to C, summed, noise sigma*C, / expected batch, SGD.

    The reference draws the batch and the noise from a twin seeded source in
    the same order as the trainer (membership, then weight, then bias).
    """
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(40, DIM, generator=generator), torch.randint(0, LABELS, (40,), generator=generator)
    head = torch.nn.Linear(DIM, LABELS).to(CPU)
    start = {name: p.detach().clone() for name, p in head.named_parameters()}
    sigma, clip, learning_rate = 0.7, 0.5, 0.3
    mechanism = sgd_mechanism(sigma, 10, 40, 1, clip)
    train_private_features(head, features, labels, mechanism, learning_rate, NoiseSource.seeded(5), optimizer="sgd")

    twin = NoiseSource.seeded(5)
    index = twin.poisson(40, mechanism.sample_rate)
    assert 0 < len(index) <= fixed_batch_size(mechanism)
    reference = torch.nn.Linear(DIM, LABELS)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(start[name])
    summed = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    for row in index:
        grads = torch.autograd.grad(
            F.cross_entropy(reference(features[row : row + 1]), labels[row : row + 1]), list(reference.parameters())
        )
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = (clip / (norm + 1e-6)).clamp(max=1.0)
        for (name, _), grad in zip(reference.named_parameters(), grads):
            summed[name] += factor * grad
    for name, param in reference.named_parameters():
        noisy = (summed[name] + twin.gaussian(param.shape, sigma * clip)) / mechanism.expected_batch_size
        torch.testing.assert_close(head.state_dict()[name], start[name] - learning_rate * noisy, rtol=1e-5, atol=1e-6)


# --- Ray's share of the GPUs --------------------------------------------------------------------------------------


def parsed_by_flower(items: list[str]) -> Any:
    """What ``flwr run --federation-config "<items>"`` hands the SuperLink (Flower 1.42's own parsing)."""
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    parsed = parse_config_args([" ".join(["num-supernodes=3", *items])])
    return simulation_config_from_json({k.replace("-", "_"): v for k, v in parsed.items()})


def test_resource_options_reach_flowers_simulation_config() -> None:
    config = parsed_by_flower(client_resources_options(0.5, 4))
    assert config.num_supernodes == 3
    assert config.client_resources_num_gpus == pytest.approx(0.5)
    assert config.client_resources_num_cpus == 4
    only_gpus = parsed_by_flower(client_resources_options(1 / 3 // 1e-4 * 1e-4))
    assert only_gpus.client_resources_num_gpus == pytest.approx(0.3333, abs=1e-6)
    assert not only_gpus.HasField("client_resources_num_cpus")  # Flower's default (2) then applies
    assert client_resources_options(0, 2.0) == ["client-resources-num-gpus=0.0", "client-resources-num-cpus=2"]


@pytest.mark.parametrize(
    ("gpus", "cpus", "message"),
    [
        (-0.5, None, "share >= 0"),
        (float("nan"), None, "share >= 0"),
        (1.5, None, "fraction up to 1"),
        (0.5, 1.5, "whole number"),
        (0.5, 0, "whole number"),
    ],
)
def test_nonsense_resources_are_refused(gpus: float, cpus: float | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        client_resources_options(gpus, cpus)


def test_default_share_is_zero_without_cuda(no_cuda: None) -> None:
    assert default_gpus_per_site(3) == 0.0
    with pytest.raises(ValueError, match="number of sites"):
        default_gpus_per_site(0)


@pytest.mark.parametrize(
    ("gpus", "sites", "share"), [(1, 1, 1.0), (1, 2, 0.5), (1, 3, 0.3333), (2, 3, 0.6666), (4, 2, 1.0)]
)
def test_default_share_lets_every_site_hold_a_gpu_at_once(
    monkeypatch: pytest.MonkeyPatch, gpus: int, sites: int, share: float
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert default_gpus_per_site(sites) == share
    assert sites * share <= gpus  # Ray can place every site's actor together
    flower = parsed_by_flower(client_resources_options(share))  # Flower stores a float32: still fits
    assert int(gpus / flower.client_resources_num_gpus) >= min(sites, gpus / share - 1e-9)


# --- the benchmark, on the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_gpu_runs_the_cpu_rows_and_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import sys

    from simulations import bench_gpu

    out = tmp_path / "bench.json"
    argv = ["bench_gpu", "--devices", "cpu", "--train", "12", "--test", "8", "--lora-steps", "1", "--probe-steps", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    bench_gpu.main()
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["device"] == "cpu" and row["train_records"] == 12 and row["test_records"] == 8
    assert all(row[key] > 0 for key in ("embed_records_per_second", "probe_steps_per_second", "lora_steps_per_second"))
    assert 0.0 <= row["eval_accuracy"] <= 1.0
