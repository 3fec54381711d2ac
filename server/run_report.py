"""The run directory: metrics.jsonl (a row per site per round), summary.json, checkpoints."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedcl.atomic_files import save_arrays_atomic, write_json_atomic
from strategies.site_strategy import SiteReply

__all__ = ["RunReport", "save_arrays_atomic", "write_json_atomic"]


class RunReport:
    """Collects per-site rows round by round and writes the run directory.

    A fresh report empties ``metrics.jsonl``. A resumed one (``resume_round``
    = the checkpoint's round ``k``) never truncates it: it reads back the rows
    in force up to round ``k`` (for the summary), then appends a
    ``{"event": "resume", "round": k}`` row. Rows of rounds after ``k``
    written before an interruption stay in the file but are superseded by
    the rows that follow the marker (readers take, per round and site, the
    last row; :func:`rows_in_force` does).
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_round: int | None = None) -> None:
        self.run_dir = run_dir
        self.config = config
        self.started = time.time()
        self.rows: list[dict[str, Any]] = []
        self.resume_round = resume_round
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = run_dir / "metrics.jsonl"
        if resume_round is None:
            metrics.write_text("", encoding="utf-8")
            write_json_atomic(run_dir / "config.json", config)
        else:
            lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
            earlier = rows_in_force([json.loads(line) for line in lines if line.strip()])
            self.rows = [r for r in earlier if "site" in r and r.get("round", 0) <= resume_round]
            self.append_rows([{"event": "resume", "round": resume_round, "continues_at": resume_round + 1}])
        self.earlier_rows = list(self.rows)  # the site rows from before this session (empty for a fresh run)

    def append_rows(self, rows: list[dict[str, Any]]) -> None:
        """Append rows to metrics.jsonl (flushed and fsynced)."""
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def add_round(
        self,
        server_round: int,
        train: list[SiteReply],
        evaluated: list[SiteReply],
        bytes_down_train: int,
        bytes_down_eval: int,
        extra: dict[str, Any] | None = None,
        failure: str | None = None,
        unusable: list[str] | None = None,
    ) -> list[dict]:
        """Merge each site's train and evaluate replies into one row; append them to metrics.jsonl.

        ``failure``: why the round failed (its rows then carry ``round_status:
        "failed"``, and one more row ``{"round", "event": "round-failed",
        "reason", "unusable_sites"}`` names the sites that were missing or
        unusable). Returns the site rows.
        """
        sites = sorted({r.site for r in train} | {r.site for r in evaluated})
        by_site_train = {r.site: r for r in train}
        by_site_eval = {r.site: r for r in evaluated}
        rows = []
        for site in sites:
            t, e = by_site_train.get(site), by_site_eval.get(site)
            row: dict[str, Any] = {"round": server_round, "site": site, **(extra or {})}
            if failure is not None:
                row["round_status"] = "failed"
            if t is not None:
                sent = t.status != "missing" or t.info.get("sent", True)
                row.update(
                    {
                        "train_status": t.status,
                        "train_reason": t.reason,
                        "train_loss": t.metrics.get("train-loss"),
                        "train_examples": t.metrics.get("num-examples"),
                        "train_seconds": t.metrics.get("train-seconds"),
                        "bytes_up": t.bytes_up,
                        "bytes_down": (bytes_down_train if sent else 0)
                        + (bytes_down_eval if e is not None and e.status != "missing" else 0)
                        + t.protocol_bytes_down,
                    }
                )
                row.update(
                    {
                        k.replace("-", "_"): v
                        for k, v in t.metrics.items()
                        if k not in ("train-loss", "num-examples", "train-seconds")
                    }
                )
            if e is not None:
                row.update(
                    {
                        "accuracy": e.metrics.get("accuracy"),
                        "eval_loss": e.metrics.get("eval-loss"),
                        "test_examples": e.metrics.get("num-examples"),
                        "eval_seconds": e.metrics.get("eval-seconds"),
                        "eval_status": e.status,
                    }
                )
                if e.reason:
                    row["eval_reason"] = e.reason
            rows.append(row)
        marker = []
        if failure is not None:
            marker = [
                {"round": server_round, "event": "round-failed", "reason": failure, "unusable_sites": unusable or []}
            ]
        self.append_rows(rows + marker)
        self.rows.extend(rows)
        return rows

    def summary(self, base_model_bytes: int | None, extra: dict[str, Any]) -> dict[str, Any]:
        """Build and write summary.json from the rows so far plus ``extra``."""
        last_round = max((r["round"] for r in self.rows), default=0)
        measured = [r for r in self.rows if r.get("accuracy") is not None and r.get("round_status") != "failed"]
        last_measured = max((r["round"] for r in measured), default=0)
        final = [r for r in measured if r["round"] == last_measured]
        updates = [r["bytes_up"] for r in self.rows if r.get("train_status") == "trained"]
        summary = {
            "config": self.config,
            "rounds_completed": last_round,
            "accuracy": float(np.mean([r["accuracy"] for r in final])) if final else None,
            "accuracy_round": last_measured or None,  # the last round that was not failed and was evaluated
            "per_site": {
                r["site"]: {
                    "accuracy": r["accuracy"],
                    "test_examples": r.get("test_examples"),
                    "train_examples": r.get("train_examples"),
                }
                for r in final
            },
            "bytes": {
                "up_total": int(sum(r.get("bytes_up", 0) or 0 for r in self.rows)),
                "down_total": int(sum(r.get("bytes_down", 0) or 0 for r in self.rows)),
                "up_per_update_mean": float(np.mean(updates)) if updates else 0.0,
                "base_model_bytes": base_model_bytes,
                "update_fraction_of_base": (
                    float(np.mean(updates)) / base_model_bytes if updates and base_model_bytes else None
                ),
            },
            "wall_seconds": time.time() - self.started,
            **extra,
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary


def rows_in_force(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl in file order, without those a later resume marker superseded.

    A ``{"event": "resume", "round": k}`` row drops the rows before it with
    ``round > k`` (written by an interrupted session after its last checkpoint).
    """
    kept: list[dict[str, Any]] = []
    for row in rows:
        if row.get("event") == "resume":
            kept = [r for r in kept if r.get("round", 0) <= row["round"]]
        kept.append(row)
    return kept
