"""The default recipe chooses its private head from public facts only: the label count, dp, the stream keys."""

from __future__ import annotations

import pytest

from fedcl.recipe_choice import NCM_FROM_CLASSES, choose_recipe
from fedcl.run_config import parse_run_config


def config(labels: int, **keys):
    names = ",".join(f"label-{i}" for i in range(labels))
    return parse_run_config({"labels": names, **keys})


@pytest.mark.parametrize(
    ("labels", "keys", "recipe"),
    [
        (5, {}, "probe-then-lora"),  # BBC News: the private probe wins on few classes
        (NCM_FROM_CLASSES - 1, {}, "probe-then-lora"),
        (NCM_FROM_CLASSES, {}, "ncm"),
        (150, {}, "ncm"),  # CLINC150
        (150, {"dp": False}, "probe-then-lora"),  # without noise the trained head wins
        (150, {"stream": "class-incremental", "num-experiences": 5, "replay-size": 30}, "probe-then-lora"),
        (150, {"stream": "class-incremental", "num-experiences": 5}, "ncm"),
        (150, {"recipe": "lora"}, "lora"),  # an explicit recipe is kept
        (5, {"recipe": "ncm"}, "ncm"),
    ],
)
def test_auto_follows_the_public_facts(labels: int, keys: dict, recipe: str) -> None:
    chosen = config(labels, **keys)
    assert chosen.recipe == keys.get("recipe", "auto")
    assert chosen.chosen_recipe == recipe == choose_recipe(chosen).recipe
    assert choose_recipe(chosen).reason


def test_an_ncm_choice_drives_the_schedule_and_the_round_count() -> None:
    from fedcl.experience_schedule import ExperienceSchedule

    chosen = config(150)
    schedule = ExperienceSchedule.from_config(chosen, 1)
    assert chosen.continual and schedule.ncm and chosen.probe_phase_rounds == 0
    assert not config(5).continual


@pytest.mark.parametrize(
    ("labels", "records", "recipe"),
    [
        (150, 5000, "ncm"),  # CLINC150 full: 33 per class per site, where the NCM won by 7.7 points
        (16, 240, "ncm"),  # the MedQuAD stream's sites: 15 per class
        (16, 3203, "probe-then-lora"),  # all of MedQuAD: about 200 per class, where the probe won by 3.3 points
        (150, 0, "ncm"),  # undeclared: the label count decides
    ],
)
def test_declared_records_per_class_turn_the_choice(labels: int, records: int, recipe: str) -> None:
    chosen = config(labels, **{"records-per-site": records})
    assert chosen.chosen_recipe == recipe
    if records:
        assert "per class" in choose_recipe(chosen).reason or recipe == "ncm"


def test_the_launcher_declares_the_mean_site_size(tmp_path) -> None:
    from simulations.run import prepare_config

    prepared = prepare_config({"max-train-examples": 40, "output-dir": str(tmp_path / "run")}, tmp_path)
    assert prepared.records_per_site == 40  # BBC split into 3 sites, each capped at 40 training records
    assert prepared.chosen_recipe == "probe-then-lora"  # 5 labels
