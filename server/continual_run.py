"""The server's side of a continual run: the experience schedule it sends, and the accuracy matrix it builds.

With a stream (or the nearest-class-mean recipe) the server computes the
experience plan once from the run config's public label set and stream keys
(``fedcl/experience_plan.py``; the server needs no data), runs ``J + max(site-offsets)`` slots of
``rounds-per-experience`` rounds (``fedcl/experience_schedule.py``) and sends
with every training round its phase, slot, round within the slot and the plan
as JSON. After the last round of each slot it sums the sites' evaluation
counts (``exp-J-correct``/``exp-J-total``, the global model on every site's
test split of every experience seen so far) into row ``i`` of the accuracy
matrix ``R[i][j]``, appends the per-experience row to ``metrics.jsonl`` and,
at the end, gives summary.json its ``continual`` object
(``server/continual_metrics.py``: Avalanche's definitions).

``joint``: one slot of every experience at once; its matrix is the single
row after training, with no forgetting to speak of (``forgetting`` and
``bwt`` are null).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from fedcl.experience_plan import describe_plan, plan_from_config
from fedcl.experience_schedule import ExperienceSchedule
from fedcl.run_config import RunConfig
from server.continual_metrics import accuracy_matrix, continual_summary, experience_rows
from server.strategy_setup import build_strategy
from strategies.ncm_aggregator import ClassSumAggregator
from strategies.site_strategy import SiteReply, SiteStrategy


class ContinualRun:
    """Schedule and accuracy matrix of one continual run (see the module docstring)."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.plan = plan_from_config(config)
        self.plan_json = json.dumps(self.plan.to_dict(), sort_keys=True)
        self.schedule = ExperienceSchedule.from_config(config, len(self.plan))
        self.correct: list[list[int]] = []
        self.total: list[list[int]] = []
        log(
            INFO,
            "fedcl: stream %s by %s, %d experiences (%s); %d slots x %d rounds",
            config.stream,
            config.stream_by,
            len(self.plan),
            describe_plan(self.plan),
            self.schedule.slots,
            self.schedule.rounds_per_slot,
        )

    @property
    def total_rounds(self) -> int:
        """Server rounds of the whole run."""
        return self.schedule.total_rounds

    def round_config(self, server_round: int) -> dict[str, Any]:
        """What a training round carries: phase, slot, round within the slot, rounds left, the plan (JSON)."""
        return self.schedule.round_config(server_round, self.plan_json)

    def phase(self, server_round: int) -> str:
        """The phase of ``server_round`` (probe, lora or ncm), for the log."""
        return self.schedule.position(server_round).phase

    def strategy(self, default: SiteStrategy) -> SiteStrategy:
        """The run's strategy: ``default``, except the class-sum adder for the nearest-class-mean recipe."""
        if self.config.chosen_recipe != "ncm":
            return default
        return build_strategy(
            self.config, self.round_config, aggregator=ClassSumAggregator(), every_site=self.every_site
        )

    def every_site(self, server_round: int) -> bool:
        """True after an experience's last round: the accuracy matrix's row needs every site's evaluation."""
        return self.schedule.position(server_round).last_of_slot

    def on_round_end(self, server_round: int, evaluated: Sequence[SiteReply]) -> dict[str, Any] | None:
        """After a slot's last round: add row ``slot`` of the matrix from the sites' counts; returns its row."""
        where = self.schedule.position(server_round)
        if not where.last_of_slot:
            return None
        width = self.schedule.num_experiences if self.config.joint else where.slot + 1
        correct, total = [0] * width, [0] * width
        for reply in evaluated:
            for j in range(width):
                correct[j] += int(reply.metrics.get(f"exp-{j}-correct", 0))
                total[j] += int(reply.metrics.get(f"exp-{j}-total", 0))
        self.correct.append(correct)
        self.total.append(total)
        row = {"round": server_round, **self._rows()[-1]}
        _append_jsonl(self.run_dir / "metrics.jsonl", row)
        forgetting = row.get("forgetting")
        log(
            INFO,
            "fedcl: experience %d done: average accuracy %s, forgetting %s",
            where.slot,
            _fmt(row.get("average_accuracy")),
            _fmt(forgetting),
        )
        return row

    def summary(self) -> dict[str, Any] | None:
        """summary.json's ``continual`` object (None before the first slot ended)."""
        if not self.correct:
            return None
        counts = self._test_counts()
        if self.config.joint:
            matrix = [[c / n if n else None for c, n in zip(self.correct[-1], self.total[-1])]]
            pooled = sum(self.correct[-1]) / sum(self.total[-1]) if sum(self.total[-1]) else None
            body: dict[str, Any] = {
                "accuracy_matrix": matrix,
                "average_accuracy": pooled,
                "forgetting": None,
                "bwt": None,
                "joint": True,
            }
        else:
            body = continual_summary(accuracy_matrix(self.correct, self.total), counts)
        return {
            **body,
            "test_counts": counts,
            "plan": self.plan.to_dict(),
            "slots": self.schedule.slots,
            "rounds_per_experience": self.schedule.rounds_per_slot,
        }

    def _test_counts(self) -> list[int]:
        """Test records per experience, summed over sites (the widest row knows every seen experience)."""
        widest = max(self.total, key=len)
        return list(widest) + [0] * (self.schedule.num_experiences - len(widest))

    def _rows(self) -> list[dict[str, Any]]:
        if self.config.joint:
            summary = self.summary() or {}
            return [
                {
                    "experience": "joint",
                    "accuracy": summary.get("accuracy_matrix", [[]])[0],
                    "average_accuracy": summary.get("average_accuracy"),
                    "forgetting": None,
                    "bwt": None,
                }
            ]
        return experience_rows(accuracy_matrix(self.correct, self.total), self._test_counts())

    def state(self) -> dict[str, Any]:
        """The accuracy matrix's counts so far, JSON-ready, for the server's checkpoint."""
        return {"correct": [list(row) for row in self.correct], "total": [list(row) for row in self.total]}

    def restore(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (a resumed run goes on adding rows after these)."""
        correct, total = list(state.get("correct", [])), list(state.get("total", []))
        if len(correct) != len(total) or len(correct) > self.schedule.slots:
            raise ValueError(
                f"a continual checkpoint with {len(correct)} rows of correct counts and {len(total)} of totals "
                f"does not fit this run's {self.schedule.slots} slots: resume with the run config it was written with"
            )
        self.correct = [[int(c) for c in row] for row in correct]
        self.total = [[int(n) for n in row] for row in total]


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(row, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
