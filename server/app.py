"""The ServerApp: rounds of federated training and evaluation, the checkpoint, and the run report.

It knows no training details: it parses the run config, runs the strategy's
round loop, writes one metrics row per site per round, logs one progress
line per round (``server/progress.py``), checkpoints the server's whole state
after every round (``server/checkpoint.py``) and, at the end, exports the
global adapter in PEFT format with a summary.json beside it and writes the
report page (``server/report_page.py``). ``tensorboard = true`` also writes
TensorBoard event files as the rounds go (``server/tensorboard_log.py``).

A round short of ``min-replies`` usable replies is failed (the strategy
leaves the model as it was); ``max-failed-rounds`` of them in a row stop the
run. A failed run (stopped, or one that trained nothing) gets ``"status":
"failed"`` and its reason in summary.json, and the ServerApp raises
:class:`~server.round_guard.RunFailed`, so Flower records the run as failed.
``resume = "<run-dir>"`` continues a checkpointed run at its next round, in
the same run directory.
"""

from __future__ import annotations

import time
from datetime import datetime
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedcl.protocol import to_record
from fedcl.recipe_choice import choose_recipe
from fedcl.run_config import ConfigError, RunConfig, parse_run_config
from server.adapter_export import export_adapter
from server.checkpoint import Checkpoint, open_resume, save_checkpoint, training_config
from server.continual_run import ContinualRun
from server.initial_arrays import initial_arrays
from server.message_index import index_pending_messages
from server.privacy_report import PrivacyWatch
from server.progress import RunProgress, mean_accuracy, where_in_run
from server.report_page import write_report
from server.round_guard import FAILED, RoundGuard, RunFailed
from server.run_report import RunReport
from server.strategy_setup import aggregation_summary, build_strategy, restore_strategy_state
from server.tensorboard_log import TensorBoardLog
from strategies.site_strategy import SiteStrategy, aggregator_state

app = ServerApp()


def resolve_run_dir(config: RunConfig) -> Path:
    """The run directory, made absolute: ``resume``'s, else ``output-dir``, else ``runs/<timestamp>``.

    Raises ConfigError when ``resume`` and a different ``output-dir`` are both given.
    """
    if config.resume:
        run_dir = Path(config.resume).expanduser().resolve()
        if config.output_dir and Path(config.output_dir).expanduser().resolve() != run_dir:
            raise ConfigError(
                f"config key 'output-dir' = {config.output_dir!r}: a resumed run writes into its own run directory "
                f"({run_dir}); leave output-dir empty or set it to the resume directory"
            )
        return run_dir
    if config.output_dir:
        return Path(config.output_dir).expanduser().resolve()
    return Path("runs", datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config; raise RunFailed (Flower: run failed) if it fails."""
    index_pending_messages(getattr(grid, "state", None))  # simulation engine only: see server/message_index.py
    try:
        run_federation(grid, parse_run_config(context.run_config))
    except ConfigError as err:
        log(ERROR, "fedcl: error: %s", err)
        raise RunFailed(str(err)) from None


def round_schedule(config: RunConfig, server_round: int) -> dict[str, str | int]:
    """The phase of a round and the rounds each phase still has (this one included): the plan sites calibrate for."""
    probe = config.probe_phase_rounds
    if server_round <= probe:
        return {"phase": "probe", "plan-probe-rounds": probe - server_round + 1, "plan-lora-rounds": config.num_rounds}
    return {"phase": "lora", "plan-probe-rounds": 0, "plan-lora-rounds": config.total_rounds - server_round + 1}


def run_federation(grid: Grid, config: RunConfig) -> Path:
    """Run (or resume) the run's rounds over the connected sites; returns the run directory.

    Raises :class:`RunFailed` after writing summary.json when the run failed,
    ConfigError for a resume that does not fit its checkpoint.
    """
    run_dir = resolve_run_dir(config)
    checkpoint = open_resume(config, run_dir) if config.resume else None
    if checkpoint is not None and checkpoint.finished:
        log(INFO, "fedcl: %s already ran all %d rounds; nothing to resume", run_dir, checkpoint.total_rounds)
        return run_dir
    continual = ContinualRun(config, run_dir) if config.continual else None  # stream of experiences, or ncm
    schedule = continual.round_config if continual else (lambda server_round: round_schedule(config, server_round))
    total_rounds = continual.total_rounds if continual else config.total_rounds
    if checkpoint is not None and checkpoint.total_rounds != total_rounds:
        raise ConfigError(
            f"config key 'resume' = '{run_dir}': the checkpoint is of a {checkpoint.total_rounds}-round run, this "
            f"config gives {total_rounds} rounds (the data or its experience plan changed); resume with the same data"
        )
    strategy = build_strategy(config, round_config=schedule, every_site=continual.every_site if continual else None)
    strategy = continual.strategy(strategy) if continual else strategy
    report = RunReport(run_dir, config.to_flat(), resume_round=checkpoint.round if checkpoint else None)
    guard = RoundGuard(config.max_failed_rounds)
    watch = PrivacyWatch(config.dp, config.target_epsilon)
    if checkpoint is not None:
        restore_server(checkpoint, strategy, guard, watch, continual)
        log(INFO, "fedcl: resuming %s at round %d of %d", run_dir, checkpoint.round + 1, total_rounds)
    log(INFO, "fedcl: run directory %s", run_dir)
    choice = choose_recipe(config)
    log(INFO, "fedcl: recipe %s (%s)", choice.recipe, choice.reason)
    first_round = checkpoint.round + 1 if checkpoint else 1
    progress = RunProgress(
        total_rounds, lambda r: str(schedule(r)["phase"]), config.target_epsilon if config.dp else None, first_round
    )
    log(
        INFO,
        "fedcl: round %d/%d (%s) starting: each site loads the model and embeds its records first, so this round "
        "takes longest; a line follows every round",
        first_round,
        total_rounds,
        where_in_run(schedule(first_round)),
    )
    board = open_tensorboard(run_dir, first_round) if config.tensorboard else None
    started = {"round": time.time()}

    def on_round_end(server_round: int, _arrays: ArrayRecord) -> MetricRecord:
        own_work_started = time.perf_counter()
        train = strategy.train_replies.get(server_round, [])
        evaluated = strategy.evaluate_replies.get(server_round, [])
        failure = strategy.round_failures.get(server_round)
        watch.observe(server_round, train)
        rows = report.add_round(
            server_round,
            train,
            evaluated,
            bytes_down_train=strategy.bytes_down.get((server_round, "train"), 0),
            bytes_down_eval=strategy.bytes_down.get((server_round, "evaluate"), 0),
            extra=strategy.round_diagnostics.get(server_round),
            failure=failure,
            unusable=strategy.round_unusable.get(server_round),
        )
        experience_row = None
        if continual:  # after an experience's last round: a row of the accuracy matrix (none from a short evaluation)
            measured = [r for r in evaluated if r.status == "evaluated"]
            experience_row = continual.on_round_end(
                server_round, measured if len(measured) >= strategy.required_replies else []
            )
        stop = guard.record(server_round, failure, server_round in strategy.updated_rounds)
        save_checkpoint(
            run_dir,
            Checkpoint(
                round=server_round,
                total_rounds=total_rounds,
                arrays=strategy.current,
                strategy_state=aggregator_state(strategy.aggregator),
                server=server_state(strategy, guard, watch, continual),
                config=training_config(config),
            ),
        )
        if board is not None:  # after the checkpoint: a view must never cost the run its state
            write_tensorboard(board, server_round, rows, experience_row)
        server_seconds = strategy.server_seconds.get(server_round, 0.0) + time.perf_counter() - own_work_started
        line = progress.round_line(
            server_round,
            where_in_run(schedule(server_round)),
            rows,
            failure,
            time.time() - started["round"],
            server_seconds=server_seconds,
        )
        log(ERROR if failure else INFO, "%s", line)
        started["round"] = time.time()
        if stop:
            raise RunFailed(stop)
        return MetricRecord({"mean-accuracy": mean_accuracy(rows)})

    stopped = None
    try:
        strategy.start(
            grid=grid,
            initial_arrays=to_record(checkpoint.arrays if checkpoint else initial_arrays(config)),
            num_rounds=total_rounds,
            timeout=config.round_timeout,
            train_config=ConfigRecord(),  # the site derives its round from the run config and the server round
            evaluate_config=ConfigRecord(),
            evaluate_fn=on_round_end,
            first_round=first_round,
        )
    except RunFailed as err:
        stopped = str(err)
    except Exception as err:  # write what is known, then let Flower record the failure
        write_summary(config, report, strategy, guard, watch, continual, checkpoint, f"the server failed: {err!r}")
        publish_report(run_dir)
        raise
    finally:
        if board is not None:
            board.close()
    status, reason = guard.verdict(stopped)
    summary = write_summary(config, report, strategy, guard, watch, continual, checkpoint, reason)
    publish_report(run_dir)
    if status == FAILED:
        log(ERROR, "fedcl: the run failed: %s; report in %s", reason, run_dir / "summary.json")
        raise RunFailed(str(reason))
    accuracy = "none (nothing was evaluated)" if summary["accuracy"] is None else f"{summary['accuracy']:.3f}"
    log(INFO, "fedcl: final mean accuracy %s; report in %s", accuracy, run_dir / "summary.json")
    return run_dir


def write_summary(
    config: RunConfig,
    report: RunReport,
    strategy: SiteStrategy,
    guard: RoundGuard,
    watch: PrivacyWatch,
    continual: ContinualRun | None,
    checkpoint: Checkpoint | None,
    failure: str | None,
) -> dict[str, Any]:
    """Export the global adapter (a run that did not fail only) and write summary.json; returns the summary."""
    base_bytes = None
    choice = choose_recipe(config)
    if failure is None and strategy.current and choice.recipe != "ncm":  # ncm's global state: class sums
        base_bytes = export_adapter(report.run_dir / "adapter", config, strategy.current, config.label_names)
    return report.summary(
        base_bytes,
        {
            "status": FAILED if failure else "completed",
            "recipe": {"chosen": choice.recipe, "reason": choice.reason},
            "failure_reason": failure,
            "failed_rounds": list(guard.failed_rounds),
            "resumed_from_round": checkpoint.round if checkpoint else None,
            "label_names": config.label_names or None,
            "privacy": watch.summary(),
            "ledger_regressions": list(watch.regressions),
            "aggregation": aggregation_summary(config, strategy, report.earlier_rows),
            "continual": continual.summary() if continual else None,
        },
    )


def open_tensorboard(run_dir: Path, first_round: int) -> TensorBoardLog | None:
    """The run's TensorBoard writer; None (logged) when its folder cannot be written: the run goes on without it."""
    try:
        return TensorBoardLog(run_dir, first_round)
    except Exception as err:  # an unwritable folder, a broken install: TensorBoard is a view, not the run
        log(ERROR, "fedcl: tensorboard = true, but its event files cannot be written (%r); the run goes on", err)
        return None


def write_tensorboard(
    board: TensorBoardLog, server_round: int, rows: list[dict], experience_row: dict[str, Any] | None
) -> None:
    """Append the round (and the experience's scores) to the TensorBoard file; a failure is logged, never raised."""
    try:
        board.add_round(server_round, rows)
        if experience_row is not None:
            board.add_experience(experience_row)
    except Exception as err:  # disk full, a broken event file: the run and its metrics.jsonl go on
        log(ERROR, "fedcl: TensorBoard events for round %d not written (%r)", server_round, err)


def publish_report(run_dir: Path) -> None:
    """Write the run's report page and figures (``server/report_page.py``); a failure is logged, never raised.

    The run's results are already safe in summary.json and metrics.jsonl;
    ``fedcl report RUN_DIR`` writes the page again.
    """
    try:
        page = write_report(run_dir)
    except Exception as err:  # a report is a view of files already written: it must not fail a finished run
        log(ERROR, "fedcl: the report page could not be written (%r); `fedcl report %s` tries again", err, run_dir)
        return
    log(INFO, "fedcl: report %s", page)


def server_state(
    strategy: SiteStrategy, guard: RoundGuard, watch: PrivacyWatch, continual: ContinualRun | None
) -> dict[str, Any]:
    """The server's memory for the checkpoint (JSON-ready)."""
    return {
        "guard": guard.state(),
        "privacy": watch.state(),
        "identities": strategy.identities.state(),
        "continual": continual.state() if continual else None,
    }


def restore_server(
    checkpoint: Checkpoint,
    strategy: SiteStrategy,
    guard: RoundGuard,
    watch: PrivacyWatch,
    continual: ContinualRun | None,
) -> None:
    """Put the checkpoint's server memory and aggregator state back (the global arrays go to ``strategy.start``)."""
    server = checkpoint.server
    restore_strategy_state(strategy, checkpoint.strategy_state)
    strategy.identities.restore(server.get("identities", {}))
    guard.restore(server.get("guard", {}))
    watch.restore(server.get("privacy", {}))
    if continual is not None:
        continual.restore(server.get("continual") or {})
