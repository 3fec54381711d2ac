"""Write the final global adapter and head in PEFT's own format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedcl.exported_adapter import describe_export
from fedcl.model_factory import load_adapter_model, resolve_model_path, set_trainable_arrays
from fedcl.run_config import RunConfig


def head_size(arrays: dict[str, np.ndarray]) -> int:
    """The number of labels, read from the classification head's bias."""
    biases = [v for k, v in arrays.items() if "modules_to_save" in k and k.endswith(".bias")]
    if not biases:
        raise ValueError("the global arrays hold no classification head; nothing to export")
    return int(biases[-1].shape[0])


def export_adapter(folder: Path, config: RunConfig, arrays: dict[str, np.ndarray], label_names: list[str]) -> int:
    """Save ``arrays`` as a PEFT adapter folder; returns the base model's size in bytes.

    Load it with :func:`fedcl.exported_adapter.load_exported_model`, i.e.
    ``PeftModel.from_pretrained(load_base_classifier(base, pooling, K), folder)``.
    """
    num_labels = head_size(arrays)
    adapter = load_adapter_model(config, num_labels=num_labels)
    set_trainable_arrays(adapter.model, arrays, partial=config.strategy == "ffa")  # FFA: A is the seeded one
    adapter.model.save_pretrained(str(folder))
    adapter.tokenizer.save_pretrained(str(folder))
    describe_export(folder, resolve_model_path(config.model), config.pooling, num_labels, label_names)
    base = adapter.model.get_base_model()
    return int(
        sum(
            p.numel() * p.element_size()
            for n, p in base.named_parameters()
            if "lora_" not in n and "modules_to_save" not in n
        )
    )
