"""A site's work on each device: embedding, the DP probe, DP LoRA steps and evaluation, in records or steps per second.

    .venv/bin/python -m simulations.bench_gpu [--devices auto] [--train 256] [--test 256]
        [--lora-steps 5] [--probe-steps 40] [--out runs/bench_gpu.json]

The default scenario's site work, with the code sites run: the default model
(MiniLM, LoRA r=8 on query,value, mean-pooled head; ``load_adapter_model``
on the device), BBC News from the packaged corpus (``simulations.data_sources``;
``--train`` and ``--test`` records drawn with the seed, 128 tokens), then
per device, in the order of a probe-then-lora site:

1. embed: the head inputs of the train records (``head_inputs``, batches of
   ``eval-batch-size`` 64), the cache a probe round trains on;
2. probe: ``--probe-steps`` DP-SGD steps of the head on them (expected Poisson
   batch 128, sigma 1, clip 1, SGD with momentum 0.9: ``train_private_features``);
3. DP LoRA: ``--lora-steps`` DP-SGD steps of LoRA and the head
   (``train_private``: Opacus hooks, expected batch 16 padded to the fixed
   public size, full 128-token rows, sigma 1, clip 1, SGD with momentum);
4. evaluate: what a site's evaluation does after the LoRA round: the head
   inputs of the test records under the new adapter, then the head
   (``head_inputs`` + ``evaluate_head``).

Noise comes from ``NoiseSource.secure()`` as in a deployment; it is drawn on
the CPU and moved to the device, and the time to draw one LoRA step's noise
is printed beside the rows (on a GPU it can be a visible share of a step).
Every stage runs once small as a warm-up (CUDA context, kernels) before it is
timed; CUDA timings end with ``torch.cuda.synchronize()``. The default sizes
take about a minute on 2 CPU cores; on a GPU pass larger ``--train`` and
``--test`` for stable numbers. ``--devices auto`` measures CUDA when this
process sees a GPU, then the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.device import site_device
from client.dp_training import fixed_batch_size, train_private, train_private_features
from client.head_features import evaluate_head, head_inputs, head_module
from client.local_training import Encoded, encode
from client.mechanisms import sgd_mechanism
from client.secure_noise import NoiseSource
from fedcl.model_factory import load_adapter_model, set_trainable_arrays
from fedcl.run_config import RunConfig
from simulations.data_sources import load_dataset

SIGMA, CLIP = 1.0, 1.0  # a typical calibrated noise multiplier; the step's cost does not depend on it
MOMENTUM = 0.9  # as client/phases.py
LABELS = 5  # BBC News topics


def records(config: RunConfig, tokenizer: Any, train: int, test: int, seed: int) -> tuple[Encoded, Encoded]:
    """``train`` and ``test`` BBC records (disjoint, drawn with ``seed``), tokenised as a site does."""
    data = load_dataset(config)
    if train + test > len(data):
        raise SystemExit(f"--train + --test = {train + test}: the corpus has {len(data)} records; ask for fewer")
    order = np.random.default_rng(seed).permutation(len(data))
    split = (order[:train], order[train : train + test])
    return tuple(  # type: ignore[return-value]
        encode(tokenizer, [data.texts[i] for i in rows], data.labels[rows], config.max_length) for rows in split
    )


def subset(data: Encoded, count: int) -> Encoded:
    """The first ``count`` records (the warm-up runs on a few)."""
    index = torch.arange(min(count, len(data)))
    return Encoded(data.rows(index), data.labels[index])


def timed(device: torch.device, call: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of ``call()`` (waiting for the GPU to finish) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def measure(
    device: torch.device, config: RunConfig, train: Encoded, test: Encoded, args: argparse.Namespace
) -> dict[str, Any]:
    """The four stages on ``device``; returns the row."""
    loaded = load_adapter_model(config, num_labels=LABELS, device=device)
    model = loaded.model
    set_trainable_arrays(model, loaded.initial_state)  # every device starts from the same seeded adapter
    noise = NoiseSource.secure()
    head = head_module(model)
    probe = sgd_mechanism(SIGMA, config.probe_batch_size, len(train), args.probe_steps, CLIP)
    lora = sgd_mechanism(SIGMA, config.batch_size, len(train), args.lora_steps, CLIP)

    def run_probe(features: torch.Tensor, labels: torch.Tensor, mechanism: Any) -> Any:
        return train_private_features(
            head, features, labels, mechanism, config.probe_learning_rate, noise, optimizer="sgd", momentum=MOMENTUM
        )

    def run_lora(data: Encoded, mechanism: Any) -> Any:
        return train_private(model, data, mechanism, config.learning_rate, noise, optimizer="sgd", momentum=MOMENTUM)

    def run_eval(data: Encoded) -> Any:
        return evaluate_head(head, head_inputs(model, data, config.eval_batch_size), data.labels)

    small = subset(train, 8)  # warm-ups: CUDA context, kernels, allocator; Opacus attach/detach
    head_inputs(model, small, config.eval_batch_size)
    run_probe(head_inputs(model, small, 8), small.labels, sgd_mechanism(SIGMA, 4, 8, 1, CLIP))
    run_lora(small, sgd_mechanism(SIGMA, 4, 8, 1, CLIP))
    set_trainable_arrays(model, loaded.initial_state)

    embed_seconds, features = timed(device, lambda: head_inputs(model, train, config.eval_batch_size))
    probe_seconds, _ = timed(device, lambda: run_probe(features, train.labels, probe))
    lora_seconds, outcome = timed(device, lambda: run_lora(train, lora))
    eval_seconds, evaluation = timed(device, lambda: run_eval(test))
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    noise_seconds, _ = timed(torch.device("cpu"), lambda: [noise.gaussian(shape, SIGMA * CLIP) for shape in shapes])
    set_trainable_arrays(model, loaded.initial_state)  # leave the cached model as it was loaded
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "train_records": len(train),
        "test_records": len(test),
        "embed_seconds": embed_seconds,
        "embed_records_per_second": len(train) / embed_seconds,
        "probe_steps": args.probe_steps,
        "probe_seconds": probe_seconds,
        "probe_steps_per_second": args.probe_steps / probe_seconds,
        "lora_steps": args.lora_steps,
        "lora_rows_per_step": fixed_batch_size(lora),
        "lora_seconds": lora_seconds,
        "lora_steps_per_second": args.lora_steps / lora_seconds,
        "lora_mean_batch": outcome.mean_batch_size,
        "eval_seconds": eval_seconds,
        "eval_records_per_second": len(test) / eval_seconds,
        "eval_accuracy": evaluation.accuracy,
        "noise_seconds_per_lora_step": noise_seconds,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def chosen_devices(spec: str) -> tuple[list[torch.device], str]:
    """The devices to measure and a line on CUDA: ``auto`` = CUDA when visible, then the CPU; or a list."""
    cuda_line = (
        f"CUDA: {torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else f"CUDA: absent (torch {torch.__version__}, built with CUDA {torch.version.cuda}; no GPU visible)"
        + ": CPU rows only"
    )
    if spec == "auto":
        names = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    else:
        names = spec.split(",")
    return [site_device({"device": name}) for name in names], cuda_line


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import opacus
    import peft
    import transformers

    return {
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "opacus": opacus.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    """Parse arguments, measure each device, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--devices", default="auto", help="auto (CUDA when visible, then cpu) or e.g. cpu or cuda:0,cpu"
    )
    parser.add_argument("--train", type=int, default=256, help="train records: embedded, then the probe and LoRA pool")
    parser.add_argument("--test", type=int, default=256, help="test records evaluated")
    parser.add_argument("--lora-steps", type=int, default=5, help="DP LoRA steps timed")
    parser.add_argument("--probe-steps", type=int, default=40, help="DP probe steps timed (the default probe round)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_gpu.json"))
    args = parser.parse_args()
    if min(args.train, args.test, args.lora_steps, args.probe_steps) < 1:
        parser.error("--train, --test, --lora-steps and --probe-steps must be at least 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        devices, cuda_line = chosen_devices(args.devices)
    except ValueError as err:
        parser.error(f"--devices {args.devices!r}: {err}")
    config = RunConfig()
    print(cuda_line)
    tokenizer = load_adapter_model(config, num_labels=LABELS).tokenizer  # the same tokenizer on every device
    train, test = records(config, tokenizer, args.train, args.test, args.seed)
    rows = [measure(device, config, train, test, args) for device in devices]
    print(
        f"MiniLM + LoRA(query,value), {args.train} train / {args.test} test BBC records x {config.max_length} tokens, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"{'device':<10}{'embed rec/s':>12}{'probe steps/s':>14}{'DP LoRA steps/s':>16}{'(rows/s)':>10}"
        f"{'eval rec/s':>11}{'accuracy':>9}{'noise ms/step':>14}"
    )
    for row in rows:
        print(
            f"{row['device']:<10}{row['embed_records_per_second']:>12.1f}{row['probe_steps_per_second']:>14.1f}"
            f"{row['lora_steps_per_second']:>16.2f}{row['lora_steps_per_second'] * row['lora_rows_per_step']:>10.1f}"
            f"{row['eval_records_per_second']:>11.1f}{row['eval_accuracy']:>9.3f}"
            f"{row['noise_seconds_per_lora_step'] * 1000:>14.1f}"
        )
    result = {"rows": rows, "cuda": cuda_line, "settings": vars(args) | {"out": str(args.out)}, **environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
