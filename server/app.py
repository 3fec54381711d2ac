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

from fedcl.protocol import to_numpy
from fedcl.run_config import ConfigError, RunConfig, parse_run_config
from server.adapter_export import export_adapter
from server.continual_run import ContinualRun
from server.run_report import RunReport, save_arrays_atomic
from server.strategy_setup import aggregation_summary, build_strategy, save_strategy_state
from strategies.site_strategy import SiteReply, SiteStrategy

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


def round_schedule(config: RunConfig, server_round: int) -> dict[str, str | int]:
    """The phase of a round and the rounds each phase still has (this one included): the plan sites calibrate for."""
    probe = config.probe_phase_rounds
    if server_round <= probe:
        return {"phase": "probe", "plan-probe-rounds": probe - server_round + 1, "plan-lora-rounds": config.num_rounds}
    return {"phase": "lora", "plan-probe-rounds": 0, "plan-lora-rounds": config.total_rounds - server_round + 1}


def privacy_summary(config: RunConfig, strategy: SiteStrategy) -> dict[str, dict] | None:
    """The ``privacy`` object of summary.json: each site's last reported ledger figures."""
    if not config.dp:
        return None
    sites: dict[str, dict] = {}
    for server_round in sorted(strategy.train_replies):
        for reply in strategy.train_replies[server_round]:
            if "epsilon" not in reply.metrics:
                continue
            m = reply.metrics
            entry = sites.setdefault(reply.site, {"stopped_for_budget": False})
            entry.update(
                {
                    "epsilon": m["epsilon"],
                    "delta": m.get("delta"),
                    "noise_multiplier": m.get("noise-multiplier"),
                    "max_grad_norm": m.get("max-grad-norm"),
                    "steps": m.get("dp-steps-total"),
                    "sample_rate": m.get("sample-rate"),
                    "accountant": "rdp-filter",
                    "target_epsilon": m.get("target-epsilon", config.target_epsilon),
                }
            )
            entry["stopped_for_budget"] = entry["stopped_for_budget"] or bool(m.get("stopped-for-budget"))
    return sites


def flag_step_regressions(
    server_round: int, replies: list[SiteReply], last_steps: dict[str, int], regressions: list[dict]
) -> None:
    """Flag every site whose ledger reports fewer DP steps than it reported before (a reset or rolled-back ledger).

    The server cannot see a site's disk; it remembers each site's last
    ``dp-steps-total``. A regression is marked on the reply (so metrics.jsonl
    shows ``ledger_regression``), appended to ``regressions`` (summary.json's
    ``ledger_regressions``) and logged as an error.
    """
    for reply in replies:
        steps = reply.metrics.get("dp-steps-total")
        if steps is None:
            continue
        before = last_steps.get(reply.site)
        if before is not None and int(steps) < before:
            reply.metrics["ledger-regression"] = before
            regressions.append(
                {"round": server_round, "site": reply.site, "steps_before": before, "steps_now": int(steps)}
            )
            log(
                ERROR,
                "fedcl: %s reports %d DP steps after %d: its ledger was reset or rolled back; its epsilon "
                "no longer covers what it released",
                reply.site,
                int(steps),
                before,
            )
        last_steps[reply.site] = max(int(steps), before or 0)


def run_federation(grid: Grid, config: RunConfig) -> Path:
    """Run ``num-rounds`` rounds over ``num-sites`` sites; returns the run directory."""
    run_dir = resolve_run_dir(config)
    report = RunReport(run_dir, config.to_flat())
    continual = ContinualRun(config, run_dir) if config.continual else None  # stream of experiences, or ncm
    schedule = continual.round_config if continual else (lambda server_round: round_schedule(config, server_round))
    total_rounds = continual.total_rounds if continual else config.total_rounds
    strategy = build_strategy(config, round_config=schedule)
    strategy = continual.strategy(strategy) if continual else strategy
    log(INFO, "fedcl: run directory %s", run_dir)
    state = {"round_started": time.time()}
    last_steps: dict[str, int] = {}  # site -> its last reported ledger step count
    regressions: list[dict] = []

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            state["round_started"] = time.time()
            return None
        flag_step_regressions(server_round, strategy.train_replies.get(server_round, []), last_steps, regressions)
        rows = report.add_round(
            server_round,
            strategy.train_replies.get(server_round, []),
            strategy.evaluate_replies.get(server_round, []),
            bytes_down_train=strategy.bytes_down.get((server_round, "train"), 0),
            bytes_down_eval=strategy.bytes_down.get((server_round, "evaluate"), 0),
            extra=strategy.round_diagnostics.get(server_round),
        )
        if len(arrays):
            save_arrays_atomic(run_dir / "checkpoint" / "global.npz", to_numpy(arrays))
            save_strategy_state(run_dir / "checkpoint", strategy)
        accuracies = {r["site"]: r["accuracy"] for r in rows if r.get("accuracy") is not None}
        mean = sum(accuracies.values()) / len(accuracies) if accuracies else float("nan")
        epsilons = [r["epsilon"] for r in rows if r.get("epsilon") is not None]
        spent = f"; epsilon spent up to {max(epsilons):.2f} of {config.target_epsilon}" if epsilons else ""
        log(
            INFO,
            "fedcl: round %d/%d (%s) done in %.1f s: mean accuracy %.3f (%s)%s",
            server_round,
            total_rounds,
            schedule(server_round)["phase"],
            time.time() - state["round_started"],
            mean,
            ", ".join(f"{site} {acc:.3f}" for site, acc in sorted(accuracies.items())),
            spent,
        )
        if continual:  # after an experience's last round: a row of the accuracy matrix
            continual.on_round_end(server_round, strategy.evaluate_replies.get(server_round, []))
        state["round_started"] = time.time()
        return MetricRecord({"mean-accuracy": mean})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),  # sites start from the same seeded adapter: nothing to send
        num_rounds=total_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord(),  # the site derives its round from the run config and the server round
        evaluate_config=ConfigRecord(),
        evaluate_fn=on_round_end,
    )
    labels = next(
        (
            r.info.get("label-names")
            for replies in strategy.train_replies.values()
            for r in replies
            if r.info.get("label-names")
        ),
        None,
    )
    base_bytes = None
    if len(result.arrays) and config.recipe != "ncm":  # ncm's global state is class sums, not an adapter
        base_bytes = export_adapter(run_dir / "adapter", config, to_numpy(result.arrays), list(labels or []))
    summary = report.summary(
        base_bytes,
        {
            "label_names": list(labels) if labels else None,
            "privacy": privacy_summary(config, strategy),
            "ledger_regressions": regressions,
            "aggregation": aggregation_summary(config, strategy),
            "continual": continual.summary() if continual else None,
        },
    )
    log(INFO, "fedcl: final mean accuracy %s; report in %s", summary["accuracy"], run_dir / "summary.json")
    return run_dir
