"""Benchmark: the nearest-class-mean release under secure aggregation with distributed discrete Gaussian noise.

The project's closed-form private head (the ``ncm`` recipe's class sums of ``[a x, b]``, scored by the shipped rule
4c of ``simulations/bench_private_heads.py``: debiased cosine x kappa plus the log class prior) on the same
scenarios and features as that benchmark (``clinc150-large-plain``: 3 IID sites, 1,500 train records each, all 150
intents at once; ``clinc150-large``: the 5-experience stream; ``medquad``). Rows, each at epsilon 8 and delta 1e-5 per
site (add/remove one record; ``--epsilon`` for another budget), the noise priced by the project's RDP filter:

1. non-private (the same rule without noise);
2. per-site noise (what ships: each site adds the whole Gaussian noise, the server sums n of them);
3. noise once (reference): continuous Gaussian of the same total std added once to the sum, what an ideal secure
   aggregation with distributed noise allows;
4. secure aggregation, distributed discrete Gaussian, ``min-honest`` = n sites: the real mechanism code end to
   end. Each site quantises each record's row (``fedcl.secure_quantization.quantize_records``: scale 2^12,
   conditional randomised rounding to the integer-domain norm bound), sums them per class in integers, adds its
   share of discrete Gaussian noise (``client.distributed_noise.discrete_gaussian_noise``, OpenDP), wraps mod
   2^bits; the four SecAgg stages run between site and server objects (``fedcl.secure_aggregation``); the server
   unwraps and dequantises the sum. The local sigma comes from the ledger entry
   ``client.distributed_noise.gaussian_equivalent_steps``, whose RDP dominates the distributed discrete Gaussian
   bound at every order, priced by the same RDP filter as rows 2 and 3;
5. the same with ``min-honest`` = n - 1 (the weaker trust assumption costs noise).

Also measured, in-process (no network): the protocol's time per site and the server's, and the bytes a site sends,
for 3, 10 and 30 sites on one release of the CLINC150 size (150 classes x 385 coordinates).

Usage: ``python -m simulations.bench_secure_ncm [--scenarios ...] [--seeds 3] [--out runs/bench_secure_ncm.json]``;
``--flower 3 10 30`` instead runs the release round through Flower's simulation engine, secure and plain, for those
numbers of sites (BBC, 20 train records a site), and reports its seconds and bytes; ``--deployment 3`` runs the
release rounds in the deployment path (``fedcl poc``: TLS, authenticated SuperNodes), plain and secure. With
``--recipe probe-then-lora`` both measure probe and LoRA rounds instead (their tensors masked, the DP-SGD noise each
site's own).
Prints Markdown tables and writes JSON. Features come from ``bench_private_heads``' cache (/tmp/heads/features).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from simulations.bench_private_heads import (
    Scenario,
    cumulative,
    debiased_units,
    evaluate,
    linear_scorer,
    load_scenario,
    release_sigma,
    row_noise,
    seen_mask,
    unpack_counts,
)
from strategies.ncm_sums import COUNT_WEIGHT, SCORE_SCALE

SCALE = 2.0**12  # integer units per feature unit: rounding adds variance <= 1/4 unit^2 per coordinate per record
BITS = 40  # checked against every release's bound (fedcl.secure_quantization.check_sum_fits)
BETA = math.exp(-0.5)  # conditional rounding's rejection level (Kairouz et al.): the norm bound's slack
EPSILON = 8.0


def release_rows(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """The rows a record contributes: ``[a x, b]`` with unit x, clipped to norm 1 as the site clips its rows."""
    rows = np.hstack([a * x, np.full((len(x), 1), b)])
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1.0)


def ledger_noise_multiplier(epsilon: float) -> float:
    """The smallest noise multiplier of one sensitivity-1 release that the project's RDP filter prices within epsilon."""
    return release_sigma(epsilon)


def distributed_local_sigma(epsilon: float, norm_bound: float, n_honest: int, dim: int) -> tuple[float, float]:
    """(local sigma in integer units, the ledger entry's noise multiplier) for one release at ``epsilon``.

    The smallest local sigma whose dominating ledger entry (``gaussian_equivalent_steps``) the RDP filter prices
    within epsilon.
    """
    from client.distributed_noise import gaussian_equivalent_steps, local_sigma_for

    target = ledger_noise_multiplier(epsilon)
    local = local_sigma_for(target, norm_bound, n_honest)
    while True:  # tau is negligible at these sigmas; nudge up until the dominating entry is as noisy as the target
        entry = gaussian_equivalent_steps(norm_bound, local, n_honest, dim)
        if entry.noise_multiplier >= target:
            return local, entry.noise_multiplier
        local *= 1.0001


def secure_sum(vectors: dict[int, np.ndarray], bits: int) -> tuple[np.ndarray, dict[str, float]]:
    """Run the four SecAgg stages in-process over ``vectors`` (uint64 words mod 2**bits); the sum and the costs."""
    from fedcl.secure_aggregation import SecureSumServer, SiteState

    n = len(vectors)
    threshold = n // 2 + 1
    costs = {"site_seconds": 0.0, "server_seconds": 0.0, "site_bytes_up": 0.0}
    server = SecureSumServer(threshold, bits)
    clock = time.perf_counter
    states = {}
    for site in vectors:
        started = clock()
        states[site] = SiteState.start(site)
        keys = states[site].advertised_keys()
        costs["site_seconds"] += clock() - started
        server.add_public_keys(site, keys)
    request = server.share_keys_request()
    for site, state in states.items():
        started = clock()
        shares = state.share_keys(request)
        costs["site_seconds"] += clock() - started
        costs["site_bytes_up"] += sum(len(c) for c in shares.ciphertexts.values())
        server.add_encrypted_shares(site, shares)
    for site, state in states.items():
        started = clock()
        masked = state.mask_input(server.mask_request(site), vectors[site])
        costs["site_seconds"] += clock() - started
        costs["site_bytes_up"] += masked.nbytes  # int64 words, as an ArrayRecord would carry them
        server.add_masked_vector(site, masked)
    unmask = server.unmask_request()
    replies = {}
    for site, state in states.items():
        started = clock()
        replies[site] = state.reveal_shares(unmask, min_survivors=threshold)
        costs["site_seconds"] += clock() - started
        costs["site_bytes_up"] += sum(len(s) for s in replies[site].seed_shares.values())
    started = clock()
    total = server.unmask(replies)
    costs["server_seconds"] = clock() - started
    return total, {k: v / (n if k.startswith("site") else 1) for k, v in costs.items()}


def secure_release(
    scenario: Scenario, a: float, b: float, n_honest: int, rng: np.random.Generator, epsilon: float = EPSILON
) -> dict[str, Any]:
    """Per experience, the server's dequantised sum of the sites' securely aggregated, distributed-noise releases."""
    from client.distributed_noise import discrete_gaussian_noise
    from fedcl.secure_quantization import (
        check_sum_fits,
        dequantize,
        from_modular,
        quantize_records,
        rounded_norm_bound,
        to_modular,
    )

    dim = scenario.sites[0].train_x.shape[1] + 1
    norm_bound = rounded_norm_bound(SCALE, dim, BETA)
    parts, infos = [], []
    for e, classes in enumerate(scenario.experience_labels):
        coordinates = len(classes) * dim
        local, multiplier = distributed_local_sigma(epsilon, norm_bound, n_honest, coordinates)
        records = sum(int((site.train_e == e).sum()) for site in scenario.sites)
        check_sum_fits(BITS, records * norm_bound, math.sqrt(len(scenario.sites)) * local, coordinates)
        words = {}
        for index, site in enumerate(scenario.sites):
            rows = site.train_e == e
            ints = quantize_records(release_rows(site.train_x[rows], a, b), SCALE, norm_bound, rng)
            sums = np.zeros((scenario.num_classes, dim), dtype=np.int64)
            np.add.at(sums, site.train_y[rows], ints)
            share = sums[classes] + discrete_gaussian_noise((len(classes), dim), local)
            words[index + 1] = to_modular(share.reshape(-1), BITS)
        total, costs = secure_sum(words, BITS)
        release = np.zeros((scenario.num_classes, dim))
        release[classes] = dequantize(from_modular(total, BITS), SCALE).reshape(len(classes), dim)
        parts.append(release)
        infos.append({"local_sigma": local, "ledger_noise_multiplier": multiplier, "norm_bound": norm_bound, **costs})
    total_sd = math.sqrt(len(scenario.sites)) * infos[0]["local_sigma"] / SCALE  # every site adds its share
    return {"parts": parts, "noise_sd": total_sd, "info": infos[0]}


def prior_rule(scenario: Scenario, parts: list[np.ndarray], noise_var: float, count_sd: float, a: float, b: float):
    """The shipped scoring rule 4c on the server's running sums: kappa x debiased cosine + log prior."""
    scorers = []
    for k, release in enumerate(cumulative(parts)):
        sums, counts = unpack_counts(release, a, b)
        prior = np.log(np.maximum(counts, count_sd) / max(counts[seen_mask(scenario, k)].sum(), 1.0))
        scorers.append(linear_scorer(SCORE_SCALE * debiased_units(sums, noise_var), prior))
    return scorers


def plain_parts(scenario: Scenario, a: float, b: float, noise) -> list[np.ndarray]:
    """Per experience, the sum over sites of the float release plus each site's ``noise`` (None: none)."""
    dim = scenario.sites[0].train_x.shape[1] + 1
    out = []
    for e, classes in enumerate(scenario.experience_labels):
        total = np.zeros((scenario.num_classes, dim))
        for site in scenario.sites:
            rows = site.train_e == e
            value = np.zeros_like(total)
            np.add.at(value, site.train_y[rows], release_rows(site.train_x[rows], a, b))
            total += value if noise is None else value + noise(value, classes)
        out.append(total)
    return out


def measure(scenario: Scenario, seeds: int, epsilon: float = EPSILON) -> list[dict[str, Any]]:
    """Every row on one scenario at ``epsilon`` per site: mean, min and max accuracy over noise seeds."""
    b = COUNT_WEIGHT
    a = math.sqrt(1 - b * b)
    n = len(scenario.sites)
    sigma = ledger_noise_multiplier(epsilon)
    rows = []

    def row(name: str, make, private: bool = True) -> None:
        started = time.time()
        results, info = [], {}
        for seed in range(seeds if private else 1):
            rng = np.random.default_rng(seed)
            parts, noise_sd, info = make(rng)
            count_sd = max(noise_sd / b, 0.5)
            scorers = prior_rule(scenario, parts, (noise_sd / a) ** 2, count_sd, a, b)
            results.append(evaluate(scenario, scorers)["accuracy"])
        rows.append(
            {
                "scenario": scenario.name,
                "epsilon": epsilon,
                "row": name,
                "accuracy": float(np.mean(results)),
                "accuracy_min": float(min(results)),
                "accuracy_max": float(max(results)),
                "noise_sd_of_sum": noise_sd,
                "info": info,
                "seconds": time.time() - started,
            }
        )
        print(f"  {name}: {rows[-1]['accuracy']:.3f}", flush=True)

    row("1 non-private", lambda rng: (plain_parts(scenario, a, b, None), 0.0, {}), private=False)
    row(
        "2 per-site noise (ships today)",
        lambda rng: (plain_parts(scenario, a, b, row_noise(sigma, rng)), math.sqrt(n) * sigma, {"sigma": sigma}),
    )
    row(
        "3 noise once on the sum (continuous reference)",
        lambda rng: (plain_parts(scenario, a, b, row_noise(sigma / math.sqrt(n), rng)), sigma, {"sigma": sigma}),
    )
    for honest in (n, n - 1):

        def secure(rng: np.random.Generator, honest: int = honest):
            out = secure_release(scenario, a, b, honest, rng, epsilon)
            return out["parts"], out["noise_sd"], out["info"]

        row(f"4 secure aggregation + distributed discrete Gaussian, min-honest {honest} of {n}", secure)
    return rows


def protocol_costs(site_counts: list[int], classes: int = 150, dim: int = 385) -> list[dict[str, Any]]:
    """The in-process cost of one secure release of ``classes x dim`` coordinates for each number of sites."""
    from client.distributed_noise import discrete_gaussian_noise
    from fedcl.secure_quantization import to_modular

    out = []
    for n in site_counts:
        started = time.perf_counter()
        words = {i + 1: to_modular(discrete_gaussian_noise(classes * dim, 100.0), BITS) for i in range(n)}
        noise_seconds = (time.perf_counter() - started) / n
        _, costs = secure_sum(words, BITS)
        out.append(
            {
                "sites": n,
                "coordinates": classes * dim,
                "site_protocol_seconds": costs["site_seconds"],
                "site_noise_seconds": noise_seconds,
                "server_unmask_seconds": costs["server_seconds"],
                "site_bytes_up": costs["site_bytes_up"],
                "plain_bytes_up": classes * dim * 8,  # float64 release without secure aggregation
                "wall_seconds": time.perf_counter() - started,
            }
        )
        print(f"  {n} sites: {out[-1]}", flush=True)
    return out


RECIPE_ROUNDS = {  # the rounds each recipe's Flower rows run: 2 of each, so round 2 is one without model loading
    "ncm": {"recipe": "ncm", "stream": "class-incremental", "num-experiences": 2},
    "probe-then-lora": {"recipe": "probe-then-lora", "probe-rounds": 2, "num-rounds": 1},
}


def flower_rounds(site_counts: list[int], out_root: Path, recipe: str = "ncm") -> list[dict[str, Any]]:
    """Rounds of ``recipe`` through Flower's simulation engine, secure and plain, for each number of sites.

    One fresh run per row (``simulations.run.fresh_run``) of the default BBC data, IID, 20 train and 10 test records
    a site, ``max-length`` 32, one CPU per worker. ``ncm``: a class-incremental stream of 2 experiences (2 release
    rounds); ``probe-then-lora``: 2 probe rounds and 1 LoRA round. Reported: round 2's seconds (round 1 also loads
    the model and embeds) and the server's own part (its round line), the bytes up and down (summary.json, every
    round: arrays plus the protocol's records), the accuracy. Secure rows use the defaults ``secagg-min-honest`` =
    every site and ``secagg-max-colluders`` = 0.
    """
    from simulations.bench_scale import round_seconds
    from simulations.run import fresh_run

    out = []
    for n in site_counts:
        for secure in (False, True):
            overrides = {
                **RECIPE_ROUNDS[recipe],
                "num-sites": n,
                "partition": "iid",
                "max-length": 32,
                "max-train-examples": 20,
                "max-test-examples": 10,
                "secure-aggregation": secure,
            }
            name = f"{recipe}-{'secure' if secure else 'plain'}-{n}"
            run = fresh_run(overrides, out_root / name, cpus_per_site=1)
            rounds, server = round_seconds(run.run_dir)
            out.append(
                {
                    "recipe": recipe,
                    "sites": n,
                    "secure": secure,
                    "accuracy": run.summary.get("accuracy"),
                    "first_round_seconds": rounds.get(1),
                    "release_round_seconds": rounds.get(2),
                    "server_seconds": server.get(2),
                    "wall_seconds": round(run.wall_seconds, 1),
                    "bytes_up": run.summary["bytes"]["up_total"],
                    "bytes_down": run.summary["bytes"]["down_total"],
                }
            )
            print(f"  {n} sites, {'secure' if secure else 'plain'}: {out[-1]}", flush=True)
    return out


MEDQUAD = Path("../shared/data/medquad/medquad.csv")


def deployment_rounds(sites: int, out_root: Path, records: int = 40, recipe: str = "ncm") -> list[dict[str, Any]]:
    """The ncm release rounds in the deployment path (``fedcl poc``: TLS, authenticated SuperNodes), plain and secure.

    MedQuAD answers -> question type, ``records`` per site (the file split among ``sites``), ``max-length`` 32, a
    class-incremental stream of 2 experiences; each round's seconds as the ServerApp logged them (round 1 holds the
    first messages' cold start), the run's seconds from submission, and the accuracy. Flower starts a fresh
    ClientApp process for every message, so each of the three extra secure stages costs a process start per site.
    """
    import io

    from fedcl.pilot.poc import PocPlan, run_poc

    out = []
    for secure in (False, True):
        plan = PocPlan(
            sites=sites,
            data=[MEDQUAD.resolve()],
            workdir=out_root / f"deployment-{recipe}-{'secure' if secure else 'plain'}-{sites}",
            run_config=(
                " ".join(f"{key}={value!r}" for key, value in RECIPE_ROUNDS[recipe].items())
                + f" max-length=32 secure-aggregation={'true' if secure else 'false'}"
            ),
            text_column="answer",
            label_column="qtype",
            max_records=records,
            force=True,
            timeout=900,
        )
        result = run_poc(plan, io.StringIO())
        if not result.outcome.completed:
            raise RuntimeError(f"the {'secure' if secure else 'plain'} pilot run did not complete: {result.outcome}")
        summary = json.loads((result.run_dir / "summary.json").read_text(encoding="utf-8"))
        out.append(
            {
                "sites": sites,
                "secure": secure,
                "accuracy": summary.get("accuracy"),
                "round_seconds": [t.seconds for t in result.rounds],
                "run_seconds": result.timings.get("run_s"),
            }
        )
        print(f"  deployment, {sites} sites, {'secure' if secure else 'plain'}: {out[-1]}", flush=True)
    return out


def flower_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: the release round through Flower, secure against plain."""
    lines = [
        "| recipe | sites | mode | accuracy | round 1 s | round 2 s | server s, round 2 | wall s | MB up | MB down |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('recipe', 'ncm')} | {r['sites']} | {'secure' if r['secure'] else 'plain'} | {r['accuracy']:.3f} | "
            f"{r['first_round_seconds']:.1f} | {r['release_round_seconds']:.1f} | {r['server_seconds'] or 0:.2f} | "
            f"{r['wall_seconds']:.0f} | "
            f"{r['bytes_up'] / 1e6:.2f} | {r['bytes_down'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


def tables(rows: list[dict[str, Any]], costs: list[dict[str, Any]]) -> str:
    """Markdown: accuracy per scenario and row; protocol cost per number of sites."""
    lines = [
        "| scenario | release | accuracy mean (min-max over noise seeds) | noise std of the sum |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['row']} | {r['accuracy']:.3f} ({r['accuracy_min']:.3f}-{r['accuracy_max']:.3f}) "
            f"| {r['noise_sd_of_sum']:.3f} |"
        )
    lines += [
        "",
        "| sites | site: protocol s | site: noise s | server: unmask s | site bytes up (secure) | site bytes up (plain) |",
        "|---|---|---|---|---|---|",
    ]
    for c in costs:
        lines.append(
            f"| {c['sites']} | {c['site_protocol_seconds']:.3f} | {c['site_noise_seconds']:.3f} | "
            f"{c['server_unmask_seconds']:.2f} | {c['site_bytes_up'] / 1e3:.0f} kB | {c['plain_bytes_up'] / 1e3:.0f} kB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure each scenario's rows and the protocol's cost; print tables and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="*", default=["clinc150-large-plain", "clinc150-large", "medquad"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=EPSILON, help="each site's budget for the accuracy rows")
    parser.add_argument("--sites", type=int, nargs="*", default=[3, 10, 30])
    parser.add_argument("--out", default="runs/bench_secure_ncm.json")
    parser.add_argument(
        "--flower",
        type=int,
        nargs="*",
        default=None,
        help="instead: the release round through Flower's simulation engine for these numbers of sites",
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPE_ROUNDS),
        default="ncm",
        help="with --flower or --deployment: the recipe whose rounds are measured",
    )
    parser.add_argument(
        "--deployment",
        type=int,
        default=0,
        help="instead: the release rounds in the deployment path (fedcl poc over TLS) with this many sites",
    )
    args = parser.parse_args(argv)
    if args.deployment:
        rows_pilot = deployment_rounds(args.deployment, Path(args.out).parent / "bench_secure_ncm", recipe=args.recipe)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"deployment": rows_pilot}, indent=1, default=float), encoding="utf-8")
        for r in rows_pilot:
            rounds = ", ".join(f"{s:.1f}" for s in r["round_seconds"])
            kind = "secure" if r["secure"] else "plain"
            print(f"| {r['sites']} | {kind} | {r['accuracy']:.3f} | {rounds} | {r['run_seconds']:.0f} |")
        return 0
    if args.flower:
        rows_flower = flower_rounds(args.flower, Path(args.out).parent / "bench_secure_ncm", recipe=args.recipe)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"flower": rows_flower}, indent=1, default=float), encoding="utf-8")
        print(flower_table(rows_flower))
        return 0
    rows: list[dict[str, Any]] = []
    for name in args.scenarios:
        print(f"bench_secure_ncm: {name}", flush=True)
        rows += measure(load_scenario(name), args.seeds, args.epsilon)
    print("bench_secure_ncm: protocol cost", flush=True)
    costs = protocol_costs(args.sites)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "costs": costs}, indent=1, default=float), encoding="utf-8")
    print(tables(rows, costs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
