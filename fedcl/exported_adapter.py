"""The exported adapter folder: what base model and head it needs, and loading it back.

``<run>/adapter`` holds PEFT's own files (``adapter_config.json``,
``adapter_model.safetensors``), the tokenizer, and ``fedcl-model.json``,
which names the base model folder, the pooling and the number of labels:
everything needed to rebuild the ``base_model`` for
``PeftModel.from_pretrained(base_model, folder)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedcl.atomic_files import write_json_atomic

DESCRIPTION_FILE = "fedcl-model.json"


def describe_export(folder: Path, base_model: str, pooling: str, num_labels: int, label_names: list[str]) -> None:
    """Write ``fedcl-model.json`` beside the PEFT files."""
    write_json_atomic(
        folder / DESCRIPTION_FILE,
        {
            "base_model": base_model,
            "pooling": pooling,
            "num_labels": num_labels,
            "label_names": list(label_names),
        },
    )


def read_description(folder: Path | str) -> dict[str, Any]:
    """The contents of ``fedcl-model.json`` in an exported adapter folder."""
    path = Path(folder) / DESCRIPTION_FILE
    if not path.exists():
        raise ValueError(f"{path} is missing: give the adapter folder of a fedcl run (<run>/adapter)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_exported_model(folder: Path | str, base_model: str | None = None) -> Any:
    """Load an exported adapter onto its base model, in eval mode, ready to classify.

    ``base_model`` overrides the recorded base model path (for a copy on
    another machine). Equivalent to
    ``PeftModel.from_pretrained(load_base_classifier(base, pooling, k), folder)``.
    """
    from peft import PeftModel

    from fedcl.model_factory import load_base_classifier

    description = read_description(folder)
    base = load_base_classifier(
        base_model or description["base_model"], description["pooling"], int(description["num_labels"])
    )
    return PeftModel.from_pretrained(base, str(folder)).eval()
