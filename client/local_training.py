"""Plain (non-private) local training and evaluation of the adapter model on one site.

Both run on the model's device (``client.device.module_device``): the
tokenised records stay in host memory and each batch is moved there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from client.device import module_device, to_device


@dataclass(frozen=True)
class Encoded:
    """A site split, tokenised once: input tensors and labels."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, index: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs of the given rows."""
        return {name: tensor[index] for name, tensor in self.inputs.items()}


def encode(tokenizer: Any, texts: list[str], labels: np.ndarray, max_length: int) -> Encoded:
    """Tokenise texts to fixed-length tensors (padding to ``max_length``)."""
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return Encoded(inputs, torch.as_tensor(labels, dtype=torch.long))


def count_longer(tokenizer: Any, texts: list[str], max_length: int) -> int:
    """How many of ``texts`` are longer than ``max_length`` tokens, special tokens included: the ones :func:`encode` cuts.

    Tokenises once more, with room for one token past ``max_length`` and no
    padding: a text that fills that room would be cut. The count depends on
    the site's records: keep it in the site's own log, never in a reply.
    Raises ValueError for a ``max_length`` below 1.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length {max_length!r}: use the run config's max-length, a whole number >= 1")
    if not texts:
        return 0
    ids = tokenizer(list(texts), truncation=True, max_length=max_length + 1, padding=False)["input_ids"]
    return sum(len(row) > max_length for row in ids)


@dataclass(frozen=True)
class TrainOutcome:
    """What a round of local training reports."""

    mean_loss: float
    steps: int
    seconds: float


def trim_padding(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the all-padding columns on the right (same logits, less compute)."""
    longest = int(inputs["attention_mask"].sum(dim=1).max().item()) if "attention_mask" in inputs else None
    return {k: v[:, :longest] for k, v in inputs.items()} if longest else inputs


def train_plain(
    model: Any, data: Encoded, steps: int, batch_size: int, learning_rate: float, seed: int
) -> TrainOutcome:
    """Non-private local training: ``steps`` AdamW steps on batches drawn without replacement."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)  # batch order drawn on the CPU: the same on every device
    device = module_device(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    losses, order, cursor = [], torch.randperm(len(data), generator=generator), 0
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        out = model(**to_device(trim_padding(data.rows(index)), device), labels=data.labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.detach())
    model.eval()
    mean_loss = float(np.mean(torch.stack(losses).cpu().double().numpy())) if losses else float("nan")
    return TrainOutcome(mean_loss, steps, time.perf_counter() - started)


@dataclass(frozen=True)
class EvalOutcome:
    """Loss and accuracy on a split."""

    loss: float
    accuracy: float
    examples: int
    seconds: float


@torch.no_grad()
def evaluate(model: Any, data: Encoded, batch_size: int) -> EvalOutcome:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (computed on the model's device)."""
    started = time.perf_counter()
    device = module_device(model)
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        labels = data.labels[index].to(device)
        logits = model(**to_device(trim_padding(data.rows(index)), device)).logits
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    n = max(len(data), 1)
    return EvalOutcome(total_loss / n, correct / n, len(data), time.perf_counter() - started)
