"""What each virtual site asks Ray for in a simulation: GPUs and CPUs, as ``flwr run --federation-config`` options.

Flower 1.42's simulation runs each virtual site's ClientApp in a Ray actor
that holds ``client-resources-num-cpus`` CPUs (Flower's default: 2) and
``client-resources-num-gpus`` GPUs (default: 0.0). Both are keys of the
federation config (``flwr/cli/federation/simulation_config.py``, proto
``SimulationConfig.client_resources_num_cpus`` (a whole number, uint32) and
``client_resources_num_gpus`` (a float)), given to ``flwr run`` as
``--federation-config "num-supernodes=3 client-resources-num-gpus=0.33
client-resources-num-cpus=2"`` (space-separated ``key=value`` items; ``flwr
run`` turns ``-`` into ``_`` and the SuperLink merges them over its
defaults). The older ``options.backend.client-resources.num-gpus`` entries of
a SuperLink connection in ``config.toml`` are deprecated in 1.42 and ignored
once ``--federation-config`` is given.

Why it matters: Ray hides every GPU (``CUDA_VISIBLE_DEVICES=""``) from an
actor that asked for none, so without ``client-resources-num-gpus > 0`` a
site's node config ``device = "auto"`` finds no CUDA and trains on the CPU,
even on a GPU machine. With a fraction (0.5: two sites share one GPU) Ray
shows the actor its assigned GPU as ``cuda:0``. Ray starts as many actors
as both resources allow (``flwr/simulation/ray_transport/ray_actor.py``,
``pool_size_from_resources``): ``min(cpus / num-cpus, gpus / num-gpus)``;
sites beyond that wait for a free actor.
"""

from __future__ import annotations

import math

_RAY_STEPS = 10_000  # Ray keeps resource amounts to four decimals: a share is rounded down to a multiple of 1e-4


def client_resources_options(num_gpus_per_site: float, num_cpus_per_site: float | None = None) -> list[str]:
    """The ``--federation-config`` items giving each virtual site ``num_gpus_per_site`` GPUs and its CPUs.

    Returns ``key=value`` strings, e.g. ``["client-resources-num-gpus=0.5",
    "client-resources-num-cpus=2"]``: join them with spaces into the value of
    one ``--federation-config`` option, beside ``num-supernodes=N``. With
    ``num_cpus_per_site = None`` the CPU item is left out (Flower's default,
    2 per site, applies). Raises ValueError for a negative or non-finite GPU
    share, a share above 1 that is not a whole number (Ray's rule), or a CPU
    count that is not a whole number >= 1 (Flower's field is an integer).
    """
    gpus = float(num_gpus_per_site)
    if not (math.isfinite(gpus) and gpus >= 0):
        raise ValueError(f"num_gpus_per_site = {num_gpus_per_site!r}: use a share >= 0, e.g. 0.5 (two sites a GPU)")
    if gpus > 1 and not gpus.is_integer():
        raise ValueError(
            f"num_gpus_per_site = {num_gpus_per_site!r}: Ray takes a fraction up to 1 or a whole number of GPUs; "
            "use e.g. 1 or 0.5"
        )
    items = [f"client-resources-num-gpus={gpus!r}"]
    if num_cpus_per_site is not None:
        cpus = float(num_cpus_per_site)
        if not (math.isfinite(cpus) and cpus >= 1 and cpus.is_integer()):
            raise ValueError(
                f"num_cpus_per_site = {num_cpus_per_site!r}: Flower's federation config takes a whole number "
                "of CPUs >= 1 per site, e.g. 2"
            )
        items.append(f"client-resources-num-cpus={int(cpus)}")
    return items


def default_gpus_per_site(num_sites: int) -> float:
    """The GPU share each virtual site asks for by default: 0 without CUDA; with CUDA, all sites fit at once.

    With ``g`` visible GPUs and ``n`` sites: ``min(1, g / n)`` rounded down to
    Ray's granularity (1e-4), so every site can hold an actor at the same
    time (GPU memory permitting: MiniLM with LoRA needs well under 1 GiB per
    site) and no site asks for more than one GPU. CPUs can still limit how
    many run together (see the module docstring). Raises ValueError for
    ``num_sites < 1``.
    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ValueError(f"num_sites = {num_sites!r}: use the federation's number of sites, >= 1")
    import torch

    if not torch.cuda.is_available():
        return 0.0
    share = min(1.0, torch.cuda.device_count() / num_sites)
    return max(1, math.floor(share * _RAY_STEPS + 1e-9)) / _RAY_STEPS  # down, so n shares never exceed the GPUs
