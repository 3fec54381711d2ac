"""The classification head's inputs, computed once by the frozen model and reused.

While every LoRA B factor is zero the adapter is the identity, so the input the
head sees for a text never changes: the site embeds its split once and trains
or evaluates the head on the cached vectors (the linear-probe phase of the
private recipe). This works for any architecture: the cache is whatever
tensor enters the head module (BERT: the pooler output).

Privacy: computing features is a local transformation of the site's own data;
nothing leaves the site and nothing is released, so it spends no budget. Only
the head trained on them with DP-SGD is released, through the ledger.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import torch
from peft.utils import ModulesToSaveWrapper

from client.local_training import Encoded, EvalOutcome, trim_padding


def head_module(model: Any) -> torch.nn.Module:
    """The trainable copy of the classification head inside a PEFT model."""
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            return module.modules_to_save[module.active_adapters[0]]
    raise ValueError("the model has no trainable head (modules_to_save); build it with task_type SEQ_CLS")


def adapter_is_identity(arrays: Mapping[str, np.ndarray]) -> bool:
    """True when every LoRA B factor is zero, so the adapted model equals the base model."""
    factors = [v for k, v in arrays.items() if "lora_B" in k]
    return bool(factors) and all(not np.any(v) for v in factors)


@torch.no_grad()
def head_inputs(model: Any, data: Encoded, batch_size: int = 64) -> torch.Tensor:
    """Run the model in eval mode and collect the tensor entering the head, for every example."""
    head = head_module(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach().clone()))
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(start + batch_size, len(data)))
            model(**trim_padding(data.rows(index)))
    finally:
        hook.remove()
    return torch.cat(captured)


@torch.no_grad()
def evaluate_head(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> EvalOutcome:
    """Loss and accuracy of the head on cached features (equal to evaluating the whole model)."""
    started = time.perf_counter()
    logits = head(features)
    loss = float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum")) / max(len(labels), 1)
    accuracy = int((logits.argmax(dim=-1) == labels).sum()) / max(len(labels), 1)
    return EvalOutcome(loss, accuracy, len(labels), time.perf_counter() - started)
