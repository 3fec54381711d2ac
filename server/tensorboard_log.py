"""TensorBoard event files for a run (run config ``tensorboard = true``), written round by round.

``tensorboard --logdir <run-dir>/tensorboard`` then shows, per round:
``accuracy/<site>``, ``accuracy/mean``, ``epsilon/<site>`` (DP runs),
``bytes/up`` and ``bytes/down`` (all sites), and after each experience of a
continual run ``continual/average_accuracy``, ``continual/forgetting`` and
``continual/bwt``. The values are the ones metrics.jsonl holds; nothing new
leaves a site.

Written with TensorBoard's own event writer (the ``tensorboard`` package,
installed with Avalanche) rather than ``torch.utils.tensorboard``: the server
stays torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TENSORBOARD_FOLDER = "tensorboard"


class TensorBoardLog:
    """Appends a run's per-round scalars to an event file under ``<run-dir>/tensorboard/``."""

    def __init__(self, run_dir: Path, first_round: int = 1) -> None:
        """Open a new event file; ``first_round`` > 1 (a resumed run) tells TensorBoard to drop the steps from there on
        that the interrupted session wrote (a session-start event at that step), so no round shows twice."""
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.folder = run_dir / TENSORBOARD_FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(self.folder), flush_secs=5)
        if first_round > 1:
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=first_round, session_log=restart))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Append one scalar at ``step`` (the server round)."""
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def add_round(self, server_round: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """A round's site rows (``server/run_report.py``): accuracy and epsilon per site, their mean, bytes."""
        accuracies = []
        for row in rows:
            if row.get("accuracy") is not None and row.get("round_status") != "failed":
                accuracies.append(float(row["accuracy"]))
                self.scalar(f"accuracy/{row['site']}", row["accuracy"], server_round)
            if row.get("epsilon") is not None:
                self.scalar(f"epsilon/{row['site']}", row["epsilon"], server_round)
        if accuracies:
            self.scalar("accuracy/mean", sum(accuracies) / len(accuracies), server_round)
        self.scalar("bytes/up", sum(int(r.get("bytes_up") or 0) for r in rows), server_round)
        self.scalar("bytes/down", sum(int(r.get("bytes_down") or 0) for r in rows), server_round)
        self.writer.flush()

    def add_experience(self, row: Mapping[str, Any]) -> None:
        """A continual run's row after an experience (``server/continual_run.py``): its three scores."""
        for key in ("average_accuracy", "forgetting", "bwt"):
            if row.get(key) is not None:
                self.scalar(f"continual/{key}", row[key], int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
