"""The ServerApp: rounds of federated training and evaluation, and the run report.

It knows no training details: it parses the run config, runs the strategy's
round loop, writes one metrics row per site per round, checkpoints the global
adapter after every round and, at the end, exports it in PEFT format with a
summary.json beside it.
"""

from __future__ import annotations

import time
from datetime import datetime
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedcl.run_config import ConfigError, RunConfig, parse_run_config
from server.adapter_export import export_adapter
from server.run_report import RunReport, save_arrays_atomic
from strategies.fedavg import FedAvgAggregator
from strategies.site_strategy import SiteStrategy, to_numpy

app = ServerApp()


def resolve_run_dir(config: RunConfig) -> Path:
    """The run directory: ``output-dir`` or ``runs/<timestamp>``, made absolute."""
    if config.output_dir:
        return Path(config.output_dir).expanduser().resolve()
    return Path("runs", datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config and write its report."""
    try:
        config = parse_run_config(context.run_config)
    except ConfigError as err:
        log(ERROR, "fedcl: %s", err)
        return
    run_federation(grid, config)


def run_federation(grid: Grid, config: RunConfig) -> Path:
    """Run ``num-rounds`` rounds over ``num-sites`` sites; returns the run directory."""
    run_dir = resolve_run_dir(config)
    report = RunReport(run_dir, config.to_flat())
    strategy = SiteStrategy(FedAvgAggregator(), num_sites=config.num_sites)
    log(INFO, "fedcl: run directory %s", run_dir)
    state = {"bytes_before_round": 0, "round_started": time.time()}

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            state["round_started"] = time.time()
            return None
        rows = report.add_round(server_round, strategy.train_replies.get(server_round, []),
                                strategy.evaluate_replies.get(server_round, []),
                                bytes_down_train=state["bytes_before_round"], bytes_down_eval=arrays.count_bytes())
        state["bytes_before_round"] = arrays.count_bytes()
        if len(arrays):
            save_arrays_atomic(run_dir / "checkpoint" / "global.npz", to_numpy(arrays))
        accuracies = {r["site"]: r["accuracy"] for r in rows if r.get("accuracy") is not None}
        mean = sum(accuracies.values()) / len(accuracies) if accuracies else float("nan")
        log(INFO, "fedcl: round %d/%d done in %.1f s: mean accuracy %.3f (%s)", server_round, config.num_rounds,
            time.time() - state["round_started"], mean,
            ", ".join(f"{site} {acc:.3f}" for site, acc in sorted(accuracies.items())))
        state["round_started"] = time.time()
        return MetricRecord({"mean-accuracy": mean})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),  # sites start from the same seeded adapter: nothing to send
        num_rounds=config.num_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({"run-dir": str(run_dir)}),
        evaluate_config=ConfigRecord({"run-dir": str(run_dir)}),
        evaluate_fn=on_round_end,
    )
    base_bytes = None
    if len(result.arrays):
        base_bytes = export_adapter(run_dir / "adapter", config, to_numpy(result.arrays))
    labels = next((r.info.get("label-names") for replies in strategy.train_replies.values() for r in replies
                   if r.info.get("label-names")), None)
    summary = report.summary(base_bytes, {"label_names": list(labels) if labels else None})
    log(INFO, "fedcl: final mean accuracy %s; report in %s", summary["accuracy"], run_dir / "summary.json")
    return run_dir
