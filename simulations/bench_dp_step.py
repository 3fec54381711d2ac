"""DP-SGD step time against a plain step: MiniLM with LoRA on query,value, batch 32, 128 tokens.

    .venv/bin/python -m simulations.bench_dp_step [--steps 10] [--block 1] [--out runs/bench_dp_step.json]

Both trainers are the ones sites run: ``train_plain`` (AdamW) and
``train_private`` (Opacus hooks, per-sample clipping, noise, AdamW underneath)
running an ``SgdMechanism`` (sigma 1, clip 1) with hardened noise from
``NoiseSource.secure()`` (OS CSPRNG, Opacus secure_mode's sum of four draws),
as a deployment runs it; the time to draw one step's noise alone is reported
beside the ratio.
The 32 records are random token ids filling all 128 positions, so no padding
is trimmed and every step sees exactly 32 x 128 tokens; the private run uses
sample rate 1 (expected batch 32 of 32 records), so its Poisson batch is all
32 every step. After one warm-up call of each, the trainers run in adjacent
pairs of calls of ``--block`` steps (Opacus attaches and detaches once per
call, so its cost is included), alternating which goes first, until each has
``--steps`` steps. The headline ratio is the median over pairs of private/plain
time per step: adjacent pairs see the same load, which matters on a shared
machine; the ratio of the fastest steps is printed beside it. Goal: at most 1.25.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from client.dp_training import per_sample_gradient_hooks, train_private
from client.local_training import Encoded, train_plain
from client.mechanisms import sgd_mechanism
from client.secure_noise import NoiseSource
from fedcl.model_factory import load_adapter_model
from fedcl.run_config import RunConfig

BATCH, LENGTH, LABELS = 32, 128, 5
GOAL = 1.25  # issue 3: DP may cost at most a quarter more per step
LEARNING_RATE = 1e-3  # small: the weights barely move, so both trainers time the same model


def random_batch(vocab_size: int, seed: int) -> Encoded:
    """32 records of 128 random non-special tokens (ids from 1000 up), all attended, random labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab_size, (BATCH, LENGTH), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return Encoded(inputs, torch.randint(0, LABELS, (BATCH,), generator=generator))


def timed(call: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(steps: int, block: int, seed: int) -> dict[str, Any]:
    """Run the interleaved measurement and return the numbers."""
    loaded = load_adapter_model(RunConfig(), num_labels=LABELS)
    model, data = loaded.model, random_batch(loaded.tokenizer.vocab_size, seed)

    def plain(n: int) -> None:
        train_plain(model, data, steps=n, batch_size=BATCH, learning_rate=LEARNING_RATE, seed=seed)

    noise = NoiseSource.secure()
    shapes = [p.shape for p in model.parameters() if p.requires_grad]

    def private(n: int) -> None:  # sample rate 1 (BATCH of BATCH records): every Poisson batch is all 32
        mechanism = sgd_mechanism(1.0, BATCH, BATCH, n, 1.0)
        train_private(model, data, mechanism, LEARNING_RATE, noise, optimizer="adamw")

    def draw_noise() -> None:
        for shape in shapes:
            noise.gaussian(shape, 1.0)

    def attach_detach() -> None:
        with per_sample_gradient_hooks(model):
            pass

    warm_plain, warm_private = timed(lambda: plain(1)), timed(lambda: private(1))
    plain_steps: list[float] = []
    private_steps: list[float] = []
    for pair in range(max(1, steps // block)):
        first, second = (plain, private) if pair % 2 == 0 else (private, plain)  # alternate who goes first
        times = {
            first: timed(lambda run=first: run(block)) / block,
            second: timed(lambda run=second: run(block)) / block,
        }
        plain_steps.append(times[plain])
        private_steps.append(times[private])
    pair_ratios = [b / a for a, b in zip(plain_steps, private_steps)]
    return {
        "batch": BATCH,
        "sequence_length": LENGTH,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps_each": block * len(plain_steps),
        "block": block,
        "warmup_seconds": {"plain": warm_plain, "private": warm_private},
        "plain_step_seconds": plain_steps,
        "private_step_seconds": private_steps,
        "plain_median": statistics.median(plain_steps),
        "private_median": statistics.median(private_steps),
        "plain_min": min(plain_steps),
        "private_min": min(private_steps),
        "ratio": statistics.median(pair_ratios),
        "ratio_of_minima": min(private_steps) / min(plain_steps),
        "goal": GOAL,
        "attach_detach_seconds": min(timed(attach_detach) for _ in range(3)),
        "secure_noise_seconds_per_step": min(timed(draw_noise) for _ in range(3)),
        "noise": "NoiseSource.secure() (os.urandom, Box-Muller, sum of 4 draws halved)",
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import opacus
    import peft
    import transformers

    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "opacus": opacus.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
    }


def main() -> None:
    """Parse arguments, measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per trainer (after warm-up)")
    parser.add_argument("--block", type=int, default=1, help="steps per trainer call (Opacus attaches once per call)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dp_step.json"))
    args = parser.parse_args()
    if args.steps < 1 or args.block < 1:
        parser.error("--steps and --block must be at least 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = {**measure(args.steps, args.block, args.seed), **environment()}
    print(
        f"MiniLM + LoRA(query,value), batch {BATCH} x {LENGTH} tokens, {result['torch_threads']} torch threads, "
        f"{result['steps_each']} steps each in blocks of {result['block']}"
    )
    print(f"{'trainer':<10}{'median s/step':>15}{'min s/step':>12}{'samples/s':>11}  all s/step")
    for name in ("plain", "private"):
        median, each = result[f"{name}_median"], result[f"{name}_step_seconds"]
        print(
            f"{name:<10}{median:>15.3f}{min(each):>12.3f}{BATCH / median:>11.1f}  {' '.join(f'{s:.2f}' for s in each)}"
        )
    verdict = "meets" if result["ratio"] <= GOAL else "misses"
    print(
        f"ratio private/plain {result['ratio']:.3f} (median of adjacent pairs; {verdict} the goal <= {GOAL}), "
        f"of minima {result['ratio_of_minima']:.3f}; "
        f"attach+detach {result['attach_detach_seconds'] * 1000:.1f} ms per call; "
        f"secure noise {result['secure_noise_seconds_per_step'] * 1000:.1f} ms per step; "
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
