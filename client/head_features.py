"""The classification head's inputs, computed once per adapter state and reused.

The input the head sees for a text depends only on the frozen base and the
LoRA factors. While those stay fixed (the probe phase, where only the head
trains, and every evaluation of a given global adapter) the site embeds a
split once and trains or evaluates the head on the cached vectors. The cache
is keyed by a fingerprint of the LoRA tensors, so it is recomputed exactly
when the adapter changes. This works for any architecture: the cache is
whatever tensor enters the head module (with `pooling = "mean"`: the unit-length
mean of the last hidden states; with "model" and BERT: the pooler output).

Privacy: computing features is a local transformation of the site's own data;
nothing leaves the site and nothing is released, so it spends no budget. Only
the head trained on them with DP-SGD is released, through the ledger.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
from peft.utils import ModulesToSaveWrapper

from client.device import module_device, to_device
from client.local_training import Encoded, EvalOutcome, trim_padding


def head_module(model: Any) -> torch.nn.Module:
    """The trainable copy of the classification head inside a PEFT model."""
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            return module.modules_to_save[module.active_adapters[0]]
    raise ValueError("the model has no trainable head (modules_to_save); build it with task_type SEQ_CLS")


def adapter_fingerprint(model: Any) -> str:
    """A digest of the LoRA tensors (not the head): equal digests mean equal head inputs."""
    digest = hashlib.sha1()
    for name, param in model.named_parameters():
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(param.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def head_inputs(model: Any, data: Encoded, batch_size: int = 64) -> torch.Tensor:
    """Run the model in eval mode and collect the tensor entering the head, for every example.

    Each batch is moved to the model's device; the result stays there
    (``(records, dim)``, the head's input dtype), ready for the probe and
    evaluation on the same device.
    """
    head = head_module(model)
    device = module_device(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach().clone()))
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(start + batch_size, len(data)))
            model(**to_device(trim_padding(data.rows(index)), device))
    finally:
        hook.remove()
    return torch.cat(captured)


@torch.no_grad()
def evaluate_head(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> EvalOutcome:
    """Loss and accuracy of the head on cached features (equal to evaluating the whole model).

    Runs on the head's device (features and labels are moved there); the outcome holds plain numbers.
    """
    started = time.perf_counter()
    device = module_device(head)
    logits, labels = head(features.to(device)), labels.to(device)
    loss = float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum")) / max(len(labels), 1)
    accuracy = int((logits.argmax(dim=-1) == labels).sum()) / max(len(labels), 1)
    return EvalOutcome(loss, accuracy, len(labels), time.perf_counter() - started)
