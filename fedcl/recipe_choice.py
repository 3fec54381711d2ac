"""The default recipe (``recipe = "auto"``): which private head a run trains, chosen from public facts only.

Measured (README, "Which head the default recipe chooses"): at epsilon 8 the
private DP-SGD probe wins on few classes with many records each (BBC News, 5
labels: 0.94), and the private nearest-class-mean release wins once there
are many classes with few records each (MedQuAD, 16 question types; CLINC150,
150 intents), where DP-SGD's noise on a wide head swamps the signal while one
Gaussian release per class sum does not; with many records per class (all
of MedQuAD, about 200 per class per site) the probe wins again. The choice
reads only the run config (the public label set, the declared
``records-per-site``, the stream keys, dp), so the server and every site
derive the same recipe without any message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedcl.run_config import RunConfig

AUTO = "auto"
NCM_FROM_CLASSES = 10  # at or above this many public labels, auto chooses the nearest-class-mean release ...
PROBE_FROM_RECORDS_PER_CLASS = 100  # ... unless the declared records per site give this many per class (measured:
# 33 per class, CLINC150 full: NCM +7.7 points; about 200, all of MedQuAD: the probe +3.3; nothing in between)


@dataclass(frozen=True)
class RecipeChoice:
    """The recipe a run trains and the reason, in words for the run header."""

    recipe: str
    reason: str


def choose_recipe(config: RunConfig) -> RecipeChoice:
    """The recipe of ``config``: its own ``recipe`` unless that is ``auto``, else the rule above."""
    if config.recipe != AUTO:
        return RecipeChoice(config.recipe, "set in the run config")
    classes = len(config.label_names)
    if not config.dp:
        return RecipeChoice("probe-then-lora", "no DP: the probe and LoRA learn past the class means")
    if config.replay_size or config.ewc_lambda or config.joint:
        return RecipeChoice("probe-then-lora", "replay, EWC or joint training asks for a trained head")
    per_class = config.records_per_site / classes if classes and config.records_per_site else 0.0
    if per_class >= PROBE_FROM_RECORDS_PER_CLASS:
        return RecipeChoice(
            "probe-then-lora",
            f"{config.records_per_site} records per site over {classes} labels, about {per_class:.0f} per class "
            f"(>= {PROBE_FROM_RECORDS_PER_CLASS}): DP-SGD learns past the class means",
        )
    if classes >= NCM_FROM_CLASSES:
        return RecipeChoice(
            "ncm",
            f"{classes} labels (>= {NCM_FROM_CLASSES}): one private class-sum release per experience beats "
            "DP-SGD on a wide head",
        )
    known = f"{classes} labels" if classes else "labels not declared yet"
    return RecipeChoice("probe-then-lora", f"{known} (< {NCM_FROM_CLASSES}): the private probe, then LoRA")
