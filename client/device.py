"""Where a site computes: node config ``device`` (auto, cpu, cuda, cuda:N)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def site_device(node_config: Mapping[str, Any]) -> torch.device:
    """The site's torch device from node config ``device`` (default ``auto``: CUDA when present, else CPU)."""
    raise NotImplementedError
