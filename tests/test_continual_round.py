"""A site's rounds in a stream, through the one site round: EWC under DP, replay in the pool and the ledger, empty
experiences, the private NCM release, the reply allow-list, and the server's accuracy matrix. Tiny random BERT,
BBC News, a few records."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from site_helpers import TRAINING_REPLY_KEYS, forget_process_state, run_round, runtime_of

from client.privacy_ledger import PrivacyLedger, compute_epsilon
from client.replay_buffer import ReplayBuffer
from client.secure_noise import NoiseSource
from fedcl.model_factory import set_trainable_arrays, trainable_arrays
from fedcl.protocol import DP_TRAIN_METRICS
from simulations.run import prepare_config, pyproject_defaults


def flat_config(model_dir, **keys) -> dict:
    return {
        **pyproject_defaults(),
        "model": str(model_dir),
        "num-sites": 2,
        "stream": "class-incremental",
        "num-experiences": 2,
        "probe-rounds": 1,
        "probe-steps": 3,
        "probe-batch-size": 8,
        "num-rounds": 0,
        "max-length": 32,
        "max-train-examples": 40,
        "max-test-examples": 20,
        "noise-multiplier": 1.0,
        "batch-size": 8,
        "local-steps": 2,
        **keys,
    }


def distance(arrays: dict, anchor: dict) -> float:
    return sum(float(np.sum((arrays[k] - anchor[k]) ** 2)) for k in anchor)


@pytest.mark.parametrize("phase", ["probe", "lora"])
def test_a_real_round_under_dp_with_ewc_passes_the_penalty(tiny_model_dir, tmp_path, monkeypatch, phase):
    """Experience 1's first round through site_round twice, same seeded noise: the real EWC penalty vs a zero one."""
    import client.site_round as site_round_module

    # lambda x learning rate / (1 - momentum) x importance stays below 2: the penalty pulls, never overshoots
    recipe = (
        {"probe-rounds": 1, "num-rounds": 0, "ewc-lambda": 5.0}
        if phase == "probe"
        else {"recipe": "lora", "num-rounds": 1, "ewc-lambda": 50.0}
    )
    flat = flat_config(
        tiny_model_dir,
        **{
            "learning-rate": 0.05,
            "probe-learning-rate": 0.1,
            "noise-multiplier": 0.0,
            "target-epsilon": 50.0,
            **recipe,
        },
    )
    runtime = runtime_of(flat)
    assert run_round(runtime, 1, tmp_path / "a").status == "trained"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    anchor = trainable_arrays(runtime.adapter.model)  # the global model after experience 0
    real_penalty, calls, results = site_round_module.penalty, [], {}

    def counted(*args, **kwargs):
        term = real_penalty(*args, **kwargs)
        assert term is not None, "EWC is on and consolidated: the round must pass a penalty"

        def wrapped(named):
            calls.append(1)
            return term(named)

        return wrapped

    def zero(*args, **kwargs):
        return lambda named: {name: torch.zeros_like(p) for name, p in named.items()}

    for name, hook, folder in (("held", counted, "a"), ("free", zero, "b")):
        monkeypatch.setattr(site_round_module, "penalty", hook)
        set_trainable_arrays(runtime.adapter.model, anchor)
        torch.manual_seed(0)  # the tiny BERT's dropout draws from the global generator
        result = run_round(runtime, 2, tmp_path / folder, noise=NoiseSource.seeded(7))
        assert result.status == "trained" and result.metrics["ewc-importance-steps"] == 10
        results[name] = trainable_arrays(runtime.adapter.model)
    assert len(calls) == (3 if phase == "probe" else 2)  # once per DP-SGD step of the round
    moved = [k for k in anchor if not np.array_equal(results["free"][k], results["held"][k])]
    assert moved and (phase == "lora" or all("classifier" in k for k in moved))  # probe rounds train the head only
    assert distance(results["held"], anchor) < distance(results["free"], anchor)


def test_ledger_counts_replayed_records_and_exactly_the_importance_steps(tiny_model_dir, tmp_path):
    """Same schedule and noise, EWC on vs off: the histories differ by the importance batches and nothing else."""
    from client.continual import stream_context

    ledgers, nominal = {}, 0
    for lam in (0.0, 10.0):
        flat = flat_config(
            tiny_model_dir,
            **{"ewc-lambda": lam, "replay-size": 6, "ewc-importance-batches": 4, "noise-multiplier": 3.0},
        )
        runtime, folder = runtime_of(flat), tmp_path / f"lambda-{lam}"
        for server_round in (1, 2):
            result = run_round(runtime, server_round, folder)
            assert result.status == "trained", result.reason
        ledgers[lam] = PrivacyLedger.load(folder / "privacy_ledger.json")
        nominal = len(runtime.data.train)
    # Every rate comes from public sizes: experience e's pool is N/J records plus the expected buffer p N e / J.
    experience, p = nominal / 2, 6 / nominal
    assert ledgers[0.0].history == [(3.0, 8 / experience, 3), (3.0, 8 / (experience * (1 + p)), 3)]
    # probe-only run: the head's importances at the probe batch on experience 0 (the same rate as its probe round,
    # so the ledger merges the two entries)
    assert ledgers[10.0].history == [(3.0, 8 / experience, 3 + 4), ledgers[0.0].history[1]]
    # the record groups each entry read: experience 0's labels, then (replay) experience 1's and the buffer's
    context = stream_context(runtime)
    names = runtime.data.label_names
    first = {names[i] for i in context.labels[0]}
    both = first | {names[i] for i in context.labels[1]}
    assert [set(g.cells) for g in ledgers[0.0].reads] == [first, both]
    assert [set(g.cells) for g in ledgers[10.0].reads] == [first, both]  # the importances read experience 0 only
    order = ledgers[10.0].filter_order
    assert ledgers[10.0].epsilon() > ledgers[0.0].epsilon()
    assert compute_epsilon(ledgers[10.0].history, 1e-5, "rdp") <= ledgers[10.0].epsilon() <= 8.0
    assert order is not None


def test_the_continual_pool_is_sampled_at_the_mechanisms_rate(tiny_model_dir, tmp_path):
    """Poisson batches over experience + buffer: mean batch = q x pool records, within a few standard errors."""
    from client.continual import absorb_finished, stream_context
    from client.mechanisms import sgd_mechanism
    from client.phases import run_probe
    from client.replay_buffer import training_pool

    runtime = runtime_of(flat_config(tiny_model_dir, **{"replay-size": 20}))
    context = stream_context(runtime)
    buffer = absorb_finished(runtime, context, tmp_path, 1, 0.5)
    pool = training_pool(context.train_positions(1), buffer)
    assert len(buffer) > 0 and len(pool) > len(context.train_positions(1))
    mechanism = sgd_mechanism(1.0, 8, 40.0, 400, 1.0)  # q = 0.2 whatever the pool holds
    outcome = run_probe(runtime, pool, mechanism, NoiseSource.seeded(3))
    q, n = mechanism.sample_rate, len(pool)
    standard_error = np.sqrt(n * q * (1 - q) / mechanism.steps)
    assert abs(outcome.mean_batch_size - q * n) < 4 * standard_error


def test_replay_buffer_survives_a_restart_and_holds_past_records_only(tiny_model_dir, tmp_path):
    flat = flat_config(tiny_model_dir, **{"num-experiences": 3, "replay-size": 20, "dp": False, "partition": "iid"})
    runtime = runtime_of(flat)
    for server_round in (1, 2, 3):
        assert run_round(runtime, server_round, tmp_path).status == "trained"
    probability = 20 / len(runtime.data.train)
    saved = ReplayBuffer.load(tmp_path, probability)
    forget_process_state()
    restarted = runtime_of(flat)
    from client.continual import stream_context

    context = stream_context(restarted)
    assert saved.experiences == [0, 1] and len(saved) > 0
    past = set(context.train_positions(0).tolist()) | set(context.train_positions(1).tolist())
    assert set(saved.positions().tolist()) <= past  # only finished experiences' records
    assert run_round(restarted, 3, tmp_path).status == "trained"  # the restarted site retries the last round
    reloaded = ReplayBuffer.load(tmp_path, probability)
    assert np.array_equal(reloaded.positions(), saved.positions()) and reloaded.experiences == [0, 1]


def write_csv(path, rows) -> None:
    path.write_text("text,label,site\n" + "".join(f"{t},{y},{s}\n" for t, y, s in rows), encoding="utf-8")


def skewed_csv(tmp_path):
    """Site A holds labels x and y only; site B all three: experience "z" is empty at site A."""
    words = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa"]
    rows = [
        (f"{words[i % 5]} {label} {i}", label, site)
        for site, labels in (("A", "xy"), ("B", "xyz"))
        for label in labels
        for i in range(10)
    ]
    path = tmp_path / "skewed.csv"
    write_csv(path, rows)
    return path


def test_an_empty_experience_runs_noise_only_steps_never_a_data_dependent_skip(tiny_model_dir, tmp_path, capsys):
    from client.head_features import head_module

    keys = {
        "dataset": str(skewed_csv(tmp_path)),
        "label-column": "label",
        "group-column": "site",
        "partition": "group",
        "stream-groups": "x,y;z",
        "num-experiences": 0,
        "max-train-examples": 0,
        "max-test-examples": 0,
    }
    flat = flat_config(tiny_model_dir, **keys, **{"noise-multiplier": 0.0})
    prepare_config(dict(keys, model=str(tiny_model_dir), stream="class-incremental", **{"num-sites": 2}), tmp_path)
    assert "site-1 has no training records in experience(s) [1]" in capsys.readouterr().err  # site-1 is group A
    empty, full = runtime_of(flat, site=1), runtime_of(flat, site=0)
    assert run_round(empty, 1, tmp_path / "a").status == "trained"
    before = head_module(empty.adapter.model).weight.detach().clone()
    noise_only = run_round(empty, 2, tmp_path / "a")
    assert noise_only.status == "trained" and noise_only.metrics["train-steps"] == 3
    assert not torch.equal(head_module(empty.adapter.model).weight.detach(), before)  # the noise moved it
    run_round(full, 1, tmp_path / "b")
    with_records = run_round(full, 2, tmp_path / "b")
    assert set(noise_only.metrics) == set(with_records.metrics) <= DP_TRAIN_METRICS  # the same reply either way
    ledger = PrivacyLedger.load(tmp_path / "a" / "privacy_ledger.json")
    assert ledger.total_steps == 6


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"replay-size": 10_000}, "replay-size.*only .* training records"),
        ({"stream-groups": "business,sport;nonsense"}, "unknown labels"),
        ({"num-experiences": 9}, "num-experiences"),
    ],
)
def test_bad_stream_input_stops_in_preflight_with_the_fix(tiny_model_dir, tmp_path, keys, words):
    from fedcl.run_config import ConfigError

    with pytest.raises(ConfigError, match=words):
        prepare_config(
            {
                "model": str(tiny_model_dir),
                "stream": "class-incremental",
                "num-experiences": 2,
                "max-train-examples": 40,
                **keys,
            },
            tmp_path,
        )


def test_ncm_releases_cost_one_release_per_record_and_are_summed_by_the_server(tiny_model_dir, tmp_path):
    from client.continual import stream_context
    from client.phases import frozen_features
    from strategies.aggregation import SiteUpdate
    from strategies.ncm_aggregator import ClassSumAggregator

    flat = flat_config(tiny_model_dir, recipe="ncm", **{"noise-multiplier": 0.0})
    runtime = runtime_of(flat)
    context = stream_context(runtime)
    total: dict = {}
    for slot in (0, 1):
        result = run_round(runtime, slot + 1, tmp_path)
        assert result.status == "trained" and set(result.metrics) <= DP_TRAIN_METRICS
        sums, variance = result.release["class-sums"], result.release["noise-variance"]
        released = np.flatnonzero(np.abs(sums).sum(axis=1) > 0)
        assert set(released) == set(context.labels[slot].tolist())  # exactly the experience's classes, noised
        assert sums.shape[1] == frozen_features(runtime, "train").shape[1] + 1  # the features plus the count column
        assert set(np.flatnonzero(variance)) == set(released)
        total = ClassSumAggregator().aggregate(total, [SiteUpdate("site-0", result.release, 1)])
    ledger = PrivacyLedger.load(tmp_path / "privacy_ledger.json")
    sigma = ledger.history[0][0]
    assert np.allclose(total["noise-variance"], sigma**2)  # every class released once, at the ledger's sigma
    assert ledger.history == [(sigma, 1.0, 1), (sigma, 1.0, 1)]  # two releases, each one Gaussian step at rate 1
    names = runtime.data.label_names
    assert [g.cells for g in ledger.reads] == [frozenset(names[i] for i in context.labels[e]) for e in (0, 1)]
    # By hand: one Gaussian release at sample rate 1 is (alpha, alpha / (2 sigma^2))-RDP, converted as Balle et al.
    # (2020, Thm 21). Each record is in one release only (disjoint experiences), so the site's epsilon is ONE
    # release's, calibrated to meet the target; composing the two in sequence would pass it.
    order, delta = ledger.filter_order, 1e-5

    def by_hand(releases: int) -> float:
        rdp = releases * order / (2 * sigma**2)
        return rdp - (np.log(delta) + np.log(order)) / (order - 1) + np.log((order - 1) / order)

    assert ledger.epsilon() == pytest.approx(by_hand(1), rel=1e-9)
    assert 8.0 - 0.2 <= by_hand(1) <= 8.0 < by_hand(2)
    assert np.count_nonzero(np.abs(total["class-sums"]).sum(axis=1)) == len(runtime.data.label_names)


def test_reply_keys_under_dp_are_the_allow_list_for_stream_replay_and_ewc_rounds(tiny_model_dir, tmp_path):
    from client.site_handlers import reply_metrics

    flat = flat_config(tiny_model_dir, **{"replay-size": 6, "ewc-lambda": 5.0, "noise-multiplier": 0.0})
    runtime = runtime_of(flat)
    base = TRAINING_REPLY_KEYS
    first, second = run_round(runtime, 1, tmp_path), run_round(runtime, 2, tmp_path)  # 2: replay + EWC importances
    assert set(first.metrics) == base and set(second.metrics) == base | {"ewc-importance-steps"}
    assert set(reply_metrics(second, dp=True)) == set(second.metrics)


def test_server_builds_the_accuracy_matrix_from_site_counts(tmp_path):
    from fedcl.run_config import parse_run_config
    from server.continual_run import ContinualRun
    from strategies.site_strategy import SiteReply

    config = parse_run_config(
        {
            "stream": "class-incremental",
            "num-experiences": 2,
            "probe-rounds": 1,
            "num-rounds": 0,
            "num-sites": 2,
            "labels": "business,entertainment,politics,sport,tech",
        }
    )
    run = ContinualRun(config, tmp_path)
    counts = {
        1: [{"exp-0-correct": 8, "exp-0-total": 10}, {"exp-0-correct": 10, "exp-0-total": 10}],
        2: [
            {"exp-0-correct": 4, "exp-0-total": 10, "exp-1-correct": 9, "exp-1-total": 10},
            {"exp-0-correct": 6, "exp-0-total": 10, "exp-1-correct": 7, "exp-1-total": 10},
        ],
    }
    for server_round, replies in counts.items():
        run.on_round_end(server_round, [SiteReply(f"site-{i}", "evaluated", metrics=m) for i, m in enumerate(replies)])
    summary = run.summary()
    assert summary["accuracy_matrix"] == [[0.9], [0.5, 0.8]]
    assert summary["forgetting"] == pytest.approx(0.4) and summary["bwt"] == pytest.approx(-0.4)
    assert summary["average_accuracy"] == pytest.approx(0.65)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["experience"], r["round"]) for r in rows] == [(0, 1), (1, 2)]


def test_probe_rounds_train_only_the_rows_of_classes_seen_so_far(tiny_model_dir, tmp_path):
    """No DP noise lands on the head rows of future classes; the evaluation predicts among seen classes only."""
    from client.continual import stream_context
    from client.evaluation import experience_metrics
    from client.head_features import head_module

    runtime = runtime_of(flat_config(tiny_model_dir))
    head = head_module(runtime.adapter.model)
    before = head.weight.detach().clone()
    assert run_round(runtime, 1, tmp_path).status == "trained"
    context = stream_context(runtime)
    seen, unseen = context.labels[0], context.labels[1]
    changed = (head.weight.detach() != before).any(dim=1)
    assert changed[torch.as_tensor(seen)].all() and not changed[torch.as_tensor(unseen)].any()
    metrics = experience_metrics(runtime, 1)
    assert metrics["experiences-seen"] == 1 and set(metrics) >= {"exp-0-correct", "exp-0-total", "accuracy"}


def test_fixed_importance_noise_is_planned_as_fixed_steps_and_the_site_stays_within_budget(tiny_model_dir, tmp_path):
    """ewc-importance-noise > 0: the importance batches use it, the calibrated DP-SGD noise covers the rest."""
    flat = flat_config(
        tiny_model_dir,
        **{
            "ewc-lambda": 5.0,
            "ewc-importance-noise": 6.0,
            "noise-multiplier": 0.0,
            "ewc-importance-batches": 3,
            "max-train-examples": 120,
            "partition": "iid",
        },
    )
    runtime = runtime_of(flat)
    for server_round in (1, 2):
        assert run_round(runtime, server_round, tmp_path).status == "trained"
    ledger = PrivacyLedger.load(tmp_path / "privacy_ledger.json")
    assert ledger.history[1] == (
        6.0,
        ledger.history[1][1],
        3,
    )  # after experience 0's probe round, before experience 1's
    assert ledger.history[0][0] != 6.0 and 8.0 - 0.2 <= ledger.epsilon() <= 8.0


def test_ewc_holds_only_the_rows_of_classes_seen_when_it_consolidates(tiny_model_dir, tmp_path):
    """Rows of classes still to come never trained: their importance is zero, so EWC leaves them free to learn."""
    from client.continual import head_prefix, stream_context
    from client.ewc import EwcState

    runtime = runtime_of(flat_config(tiny_model_dir, **{"ewc-lambda": 5.0, "dp": False}))
    for server_round in (1, 2):
        assert run_round(runtime, server_round, tmp_path).status == "trained"
    ewc = EwcState.load(tmp_path, "separate", 1.0)
    context, prefix = stream_context(runtime), head_prefix(runtime.adapter.model)
    weight = ewc.importances[0][prefix + "weight"]
    assert np.all(weight[context.labels[1]] == 0) and np.any(weight[context.labels[0]] > 0)


def test_a_site_whose_budget_is_spent_skips_with_the_reason_instead_of_failing(tiny_model_dir, tmp_path):
    """A ledger that has already spent the budget (e.g. a state directory reused): a logged skip, no crash."""
    flat = flat_config(tiny_model_dir, **{"noise-multiplier": 0.0})
    PrivacyLedger(8.0, 1e-5, [(0.5, 1.0, 100)]).save(tmp_path / "privacy_ledger.json")
    result = run_round(runtime_of(flat), 1, tmp_path)
    assert result.status == "skipped" and "privacy budget" in result.reason
    assert result.metrics["stopped-for-budget"] == 1


def test_a_buffer_kept_from_an_earlier_run_is_paid_for_by_the_groups_it_holds(tiny_model_dir, tmp_path):
    """Run 2 starts a new plan on the same state dir: its replay pool still holds run 1's records, so it pays for them."""
    first_plan, second_plan = (
        "business,entertainment;politics,sports,tech",
        "politics,sports,tech;business,entertainment",
    )
    keys = {"replay-size": 6, "noise-multiplier": 3.0}
    earlier = runtime_of(flat_config(tiny_model_dir, **{"stream-groups": first_plan, **keys}))
    for server_round in (1, 2):  # experience 0, then 1 with experience 0 in the buffer
        assert run_round(earlier, server_round, tmp_path).status == "trained"
    assert ReplayBuffer.load(tmp_path, 6 / len(earlier.data.train)).held == {
        ("label", "business"),
        ("label", "entertainment"),
    }
    later = runtime_of(flat_config(tiny_model_dir, **{"stream-groups": second_plan, **keys}))
    assert run_round(later, 1, tmp_path).status == "trained"  # experience 0 of the new plan: politics, sports, tech
    ledger = PrivacyLedger.load(tmp_path / "privacy_ledger.json")
    # its pool = the new experience 0 + the old buffer (business, entertainment): it reads all five labels
    assert ledger.reads[-1].cells == frozenset({"politics", "sports", "tech", "business", "entertainment"})


def test_a_joint_round_reads_every_record_and_a_buffer_of_unknown_groups_too(tiny_model_dir, tmp_path):
    from client.continual import stream_context
    from client.site_policy import SitePolicy
    from client.site_round import SitePlan

    joint = runtime_of(flat_config(tiny_model_dir, joint=True))
    assert run_round(joint, 1, tmp_path).status == "trained"
    assert PrivacyLedger.load(tmp_path / "privacy_ledger.json").reads == [None]
    runtime = runtime_of(flat_config(tiny_model_dir, **{"replay-size": 6}))
    context, policy = stream_context(runtime), SitePolicy(True, 8.0, 1e-5, "rdp", tmp_path, 0)
    assert SitePlan(runtime, context, policy, None).groups_read(1, replay=True) is None  # a version-2 buffer
    other = frozenset({("group:source", "cdc")})  # a buffer filled under another partition
    assert SitePlan(runtime, context, policy, other).groups_read(1, replay=True) is None
    assert SitePlan(runtime, context, policy, None).groups_read(1, replay=False).partition == "label"


def test_group_cells_are_named_after_the_column_they_come_from():
    from types import SimpleNamespace

    from client.continual import experience_groups
    from fedcl.experience_plan import ExperiencePlan

    plan = ExperiencePlan("domain-incremental", "group", (("north",), ("south",)))
    context = SimpleNamespace(plan=plan)
    by_region = SimpleNamespace(data=SimpleNamespace(stream_partition="group:region"))
    by_ward = SimpleNamespace(data=SimpleNamespace(stream_partition="group:ward"))
    first = experience_groups(by_region, context, [0])
    assert first.partition == "group:region" and first.cells == frozenset({"north"})
    assert experience_groups(by_ward, context, [0]).partition == "group:ward"  # another column: another partition


def test_a_non_private_ncm_round_releases_exact_counts_and_the_rule_decodes_its_own_rows(tiny_model_dir, tmp_path):
    """What run_class_sums builds is what predict_from_release reads: counts by hand, NCM by a plain numpy loop."""
    from client.continual import stream_context
    from client.phases import frozen_features
    from strategies.ncm_sums import COUNT_WEIGHT, FEATURE_WEIGHT, SCORE_SCALE, predict_from_release

    flat = flat_config(tiny_model_dir, recipe="ncm", dp=False)
    runtime = runtime_of(flat)
    context = stream_context(runtime)
    result = run_round(runtime, 1, tmp_path, flat=flat)
    assert result.status == "trained"
    sums, variance = result.release["class-sums"], result.release["noise-variance"]
    labels = runtime.data.train.labels.cpu().numpy()[context.train_positions(0)]
    np.testing.assert_allclose(sums[:, -1] / COUNT_WEIGHT, np.bincount(labels, minlength=len(sums)), atol=1e-9)
    assert not variance.any()
    features = frozen_features(runtime, "train")[context.train_positions(0)]
    classes = context.labels[0]
    test = frozen_features(runtime, "test")
    by_hand = []
    for x in test:
        scores = []
        for c in classes:
            total = features[labels == c].sum(axis=0)  # unit rows: their plain sum
            scores.append(
                SCORE_SCALE * x @ total / (np.linalg.norm(x) * np.linalg.norm(total)) + np.log((labels == c).sum())
            )
        by_hand.append(classes[int(np.argmax(scores))])
    assert FEATURE_WEIGHT < 1
    np.testing.assert_array_equal(predict_from_release(test, sums, variance, classes), by_hand)
