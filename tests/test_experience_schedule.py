"""The continual schedule: slots, phases, per-site offsets, joint and ncm; the stream keys' own checks."""

import pytest

from fedcl.experience_schedule import ExperienceSchedule, parse_offsets
from fedcl.run_config import ConfigError, parse_run_config


def schedule(num_experiences: int = 3, **keys) -> ExperienceSchedule:
    flat = {"stream": "class-incremental", "num-sites": 3, "probe-rounds": 2, "num-rounds": 1, **keys}
    return ExperienceSchedule.from_config(parse_run_config(flat), num_experiences)


def test_each_experience_runs_the_whole_recipe_and_late_sites_add_slots():
    plan = schedule(**{"site-offsets": "0,0,1"})
    assert (plan.rounds_per_slot, plan.slots, plan.total_rounds) == (3, 4, 12)
    phases = [plan.position(r).phase for r in range(1, 13)]
    assert phases == ["probe", "probe", "lora"] * 4
    assert [plan.position(r).slot for r in (1, 3, 4, 12)] == [0, 0, 1, 3]
    assert [r for r in range(1, 13) if plan.position(r).last_of_slot] == [3, 6, 9, 12]
    # Slot 0: site 2 has not started; slot 3: sites 0 and 1 have finished, site 2 trains its last experience.
    assert [plan.site_experience(0, site) for site in range(3)] == [0, 0, -1]
    assert [plan.site_experience(3, site) for site in range(3)] == [3, 3, 2]
    assert [plan.experiences_seen(slot) for slot in range(4)] == [1, 2, 3, 3]
    with pytest.raises(ValueError, match="outside"):
        plan.position(13)


def test_round_config_counts_the_rounds_left_in_the_slot_and_carries_the_experience():
    plan = schedule()
    first, third = plan.round_config(4, '{"plan": 1}'), plan.round_config(6)
    assert first == {
        "phase": "probe",
        "plan-probe-rounds": 2,
        "plan-lora-rounds": 1,
        "experience": 1,
        "experience-round": 0,
        "num-experiences": 3,
        "experience-plan": '{"plan": 1}',
    }
    assert (third["phase"], third["plan-probe-rounds"], third["plan-lora-rounds"], third["experience-round"]) == (
        "lora",
        0,
        1,
        2,
    )


def test_joint_is_one_slot_as_long_as_the_stream_and_ncm_one_round_per_experience():
    joint = schedule(joint=True)
    assert (joint.slots, joint.probe_rounds, joint.lora_rounds, joint.training_experiences) == (1, 6, 3, 1)
    assert joint.experiences_seen(0) == 3
    ncm = ExperienceSchedule.from_config(parse_run_config({"recipe": "ncm", "stream": "class-incremental"}), 4)
    assert (ncm.rounds_per_slot, ncm.total_rounds, ncm.position(2).phase) == (1, 4, "ncm")


@pytest.mark.parametrize("text, sites", [("0,1", 3), ("0,-1,0", 3), ("a,0,0", 3)])
def test_bad_offsets_name_the_key_and_the_fix(text, sites):
    with pytest.raises(ConfigError, match="site-offsets.*e.g."):
        parse_offsets(text, sites)
    assert parse_offsets("", 2) == (0, 0) and parse_offsets(" 1, 0", 2) == (1, 0)


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"replay-size": 10}, "replay-size.*needs a stream"),
        ({"ewc-lambda": 1.0}, "ewc-lambda.*needs a stream"),
        ({"stream": "class-incremental", "joint": True, "site-offsets": "0,0,1"}, "site-offsets.*joint"),
        ({"recipe": "ncm", "stream": "class-incremental", "replay-size": 5}, "replay-size.*nearest-class-mean"),
        ({"stream": "task-incremental"}, "stream.*none, class-incremental"),
        ({"stream": "class-incremental", "replay-policy": "fifo"}, "replay-policy.*bernoulli"),
        ({"stream": "class-incremental", "ewc-decay": 0.0}, "ewc-decay"),
        ({"stream": "class-incremental", "ewc-importance-batches": 0}, "ewc-importance-batches"),
    ],
)
def test_conflicting_stream_keys_are_refused_with_the_fix(keys, words):
    with pytest.raises(ConfigError, match=words):
        parse_run_config(keys)
