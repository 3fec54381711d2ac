"""The continual-learning round schedule, shared by server and sites: which experience each round belongs to.

A stream of ``J`` experiences (``simulations/streams.py``) is trained slot by
slot: slot ``s`` lasts ``rounds-per-experience`` rounds (the whole recipe:
``probe-rounds`` head-only rounds, then ``num-rounds`` LoRA rounds; for the
``lora`` recipe ``num-rounds``; for ``ncm`` one release round), then every
site moves on. A site with offset ``o`` (``site-offsets``) trains experience
``s - o`` in slot ``s``: before its start it trains nothing, and after its last
experience it trains nothing either, so the run has ``J + max(offsets)`` slots.
The evaluation after slot ``s`` covers experiences ``0 .. min(s, J - 1)``.

``joint = true`` (the upper bound) is one slot holding every experience at
once, as long as the whole stream (``J`` times the rounds of each phase): the
same number of DP steps as the sequential run, on the union of the data,
evaluated per experience at the end.

Pure functions of the run config and ``J``: the server computes the phase and
plan it sends; a site recomputes the same numbers from the server round (the
evaluation messages carry only ``server-round``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedcl.run_config import RunConfig, parse_offsets

__all__ = ["ExperienceSchedule", "SlotPosition", "parse_offsets"]

PROBE, LORA, NCM = "probe", "lora", "ncm"


@dataclass(frozen=True)
class SlotPosition:
    """Where a server round falls: its slot (the experience on-time sites train) and the round within it."""

    slot: int
    round_in_slot: int  # 0-based
    phase: str
    last_of_slot: bool


@dataclass(frozen=True)
class ExperienceSchedule:
    """Slots, rounds and phases of a continual run (see the module docstring)."""

    num_experiences: int  # J, from the experience plan
    probe_rounds: int  # head-only rounds at the start of each slot
    lora_rounds: int  # LoRA rounds after them
    offsets: tuple[int, ...]  # per site: experiences it starts late
    joint: bool = False
    ncm: bool = False

    @classmethod
    def from_config(cls, config: RunConfig, num_experiences: int) -> ExperienceSchedule:
        """The schedule of ``config`` for a stream of ``num_experiences`` experiences."""
        if num_experiences < 1:
            raise ValueError(f"num_experiences = {num_experiences}: a stream has at least one experience")
        scale = num_experiences if config.joint else 1
        ncm = config.chosen_recipe == NCM
        return cls(
            num_experiences,
            0 if ncm else config.probe_phase_rounds * scale,
            1 if ncm else config.num_rounds * scale,
            config.offsets,
            config.joint,
            ncm,
        )

    @property
    def training_experiences(self) -> int:
        """Experiences a site trains in sequence: 1 for joint (everything at once), else J."""
        return 1 if self.joint else self.num_experiences

    @property
    def rounds_per_slot(self) -> int:
        """Rounds of one slot (one experience, or the whole joint run)."""
        return self.probe_rounds + self.lora_rounds

    @property
    def slots(self) -> int:
        """Slots of the run: J plus the largest offset (late sites finish later); 1 for joint."""
        return 1 if self.joint else self.num_experiences + max(self.offsets, default=0)

    @property
    def total_rounds(self) -> int:
        """Server rounds of the whole run."""
        return self.slots * self.rounds_per_slot

    def position(self, server_round: int) -> SlotPosition:
        """Slot, round within the slot and phase of ``server_round`` (1-based, as Flower counts)."""
        if not 1 <= server_round <= self.total_rounds:
            raise ValueError(f"server round {server_round} is outside this schedule (1 .. {self.total_rounds})")
        slot, within = divmod(server_round - 1, self.rounds_per_slot)
        phase = NCM if self.ncm else (PROBE if within < self.probe_rounds else LORA)
        return SlotPosition(slot, within, phase, within == self.rounds_per_slot - 1)

    def site_experience(self, slot: int, site_index: int) -> int:
        """The experience site ``site_index`` trains in ``slot``: < 0 before its start, >= J after its end."""
        offset = self.offsets[site_index] if site_index < len(self.offsets) else 0
        return slot - offset

    def experiences_seen(self, slot: int) -> int:
        """How many experiences the evaluation after ``slot`` covers (all of them for joint)."""
        return self.num_experiences if self.joint else min(slot + 1, self.num_experiences)

    def rounds_left_in_slot(self, within: int) -> tuple[int, int]:
        """Probe and LoRA rounds still to run in the slot, the round ``within`` included."""
        probe_left = max(self.probe_rounds - within, 0)
        lora_left = self.lora_rounds - max(within - self.probe_rounds, 0)
        return probe_left, lora_left

    def round_config(self, server_round: int, plan_json: str = "") -> dict[str, Any]:
        """What the server sends with a training round: the phase, the rounds left in the slot, the experience.

        ``plan-probe-rounds``/``plan-lora-rounds`` cover the current slot only;
        a site adds its remaining experiences itself (they depend on its offset).
        """
        where = self.position(server_round)
        probe_left, lora_left = self.rounds_left_in_slot(where.round_in_slot)
        return {
            "phase": where.phase,
            "plan-probe-rounds": probe_left,
            "plan-lora-rounds": lora_left,
            "experience": where.slot,
            "experience-round": where.round_in_slot,
            "num-experiences": self.num_experiences,
            "experience-plan": plan_json,
        }
