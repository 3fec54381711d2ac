"""The global arrays a fresh run starts from."""

from __future__ import annotations

import numpy as np

from fedcl.model_factory import load_adapter_model
from fedcl.run_config import RunConfig


def initial_arrays(config: RunConfig) -> dict[str, np.ndarray]:
    """The arrays round 1 sends: none, or under secure aggregation of probe and LoRA rounds the seeded adapter.

    Without secure aggregation the sites start from the seeded adapter
    themselves and their round-1 replies bring the tensors to the server. A
    secure site sends only the change from the tensors its message carried
    (``client/secure_update.py``), so the server starts from the same seeded
    tensors (``fedcl.model_factory.load_adapter_model``: a function of the
    public model, seed and label set), loading the model once in its process.
    """
    if not config.secure_aggregation or config.chosen_recipe == "ncm":
        return {}
    return dict(load_adapter_model(config, num_labels=len(config.label_names)).initial_state)
