"""Where a site computes: node config ``device`` (auto, cpu, cuda, cuda:N), and moving tensors there.

The site chooses its device, like the rest of its own settings (node config,
not run config: the server never decides where a hospital's data is
computed). ``auto`` (the default) takes the GPU when this process can see
one, else the CPU. In a Flower simulation each virtual site runs in a Ray
actor that sees a GPU only when the launcher asked Ray for one per site
(``simulations/ray_resources.py``); otherwise Ray hides every GPU from it and
``auto`` is the CPU.

What runs where (every compute path follows the model: functions that get no
device take it from the model's parameters, :func:`module_device`): the
model, its forward and backward passes, Opacus' per-sample gradients and
clipping all run on the device; batches are moved there step by step (the
site's tokenised records stay in host memory); the Gaussian noise is drawn on
the CPU (the OS CSPRNG, or the seeded generator in tests) and moved to the
device, so the same source gives the same numbers on every device; whatever
leaves the site or is saved (adapter tensors, importances, class sums,
metrics) is brought back to CPU numpy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from fedcl.run_config import ConfigError

DEVICE_KEY = "device"
DEFAULT_DEVICE = "auto"  # the GPU when this process can see one: a site with a GPU uses it without being told
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def site_device(node_config: Mapping[str, Any]) -> torch.device:
    """The site's torch device from node config ``device`` (default ``auto``: CUDA when present, else CPU).

    Accepted values (case and surrounding spaces ignored): ``auto``; ``cpu``;
    ``cuda`` (the current CUDA device, normally ``cuda:0``, the first GPU this
    process sees); ``cuda:N``. A CUDA device is returned with its index
    (``cuda:0``, never a bare ``cuda``), so equal choices compare equal. Raises
    :class:`~fedcl.run_config.ConfigError` (one line naming the key, the value
    and the fix) for a CUDA device this process cannot use or any other value.
    """
    raw = node_config.get(DEVICE_KEY, DEFAULT_DEVICE)
    value = raw.strip().lower() if isinstance(raw, str) else None
    if value == "auto":
        return _current_cuda() if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    match = _CUDA.match(value) if value is not None else None
    if match is None:
        raise ConfigError(
            f"node config {DEVICE_KEY!r} = {raw!r}: not a device; use 'auto' (the GPU when present), 'cpu', "
            "'cuda' or 'cuda:N', e.g. --node-config \"device='cuda:0'\""
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"node config {DEVICE_KEY!r} = {raw!r}: this process sees no CUDA GPU ({_why_no_cuda()}); use "
            f"{DEVICE_KEY}='cpu' or 'auto', or start the SuperNode where a GPU is visible"
        )
    if match.group(1) is None:
        return _current_cuda()
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"node config {DEVICE_KEY!r} = {raw!r}: this process sees {count} CUDA device(s), cuda:0 .. "
            f"cuda:{count - 1}; use one of those (CUDA_VISIBLE_DEVICES renumbers them from 0) or 'auto'"
        )
    return torch.device("cuda", index)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (where it computes); the CPU for a module without parameters."""
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(inputs: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of model inputs (name -> tensor) on ``device`` (tensors already there are not copied)."""
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def _current_cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} has CUDA {torch.version.cuda}, but no GPU or driver is visible"
