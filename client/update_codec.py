"""The site's side of the wire format (strategies/wire.py): install the global tensors, pick and encode the reply.

FFA-LoRA (``strategy = "ffa"``): the lora_A factors stay at their seeded
initial value (identical at every site and on the server). They are refilled
from the seeded state on every message (the server does not send them),
frozen (``requires_grad = False``) only while the site trains, so DP-SGD
spends no clipping budget or noise on them, and unfrozen again afterwards:
in a simulation one cached model serves every virtual site of a worker, and
``fedcl.model_factory.trainable_arrays`` picks tensors by ``requires_grad``.
The reply carries B and the head only, except when the message carried no
arrays (round 1): then everything, so the server's checkpoint and PEFT export
hold A too.

Compression (``compression`` = fp16 / int8): the received arrays are decoded;
the reply is encoded against them (or as it is when nothing was received),
which the server undoes against ``round_trip`` of what it sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from client.fault_injection import inject_fault
from client.site_runtime import SiteRuntime
from fedcl.model_factory import set_trainable_arrays
from fedcl.protocol import ARRAYS_RECORD, to_numpy
from strategies.aggregation import Arrays
from strategies.compression import Compression
from strategies.ffa import ffa_frozen_names, ffa_trainable_names


def _uses_ffa(runtime: SiteRuntime) -> bool:
    return runtime.config.strategy == "ffa"


def received_arrays(msg: Message, runtime: SiteRuntime) -> Arrays:
    """The message's global tensors, decoded to float32 ({} when it carried none)."""
    record = msg.content.array_records.get(ARRAYS_RECORD, ArrayRecord())
    if not len(record):
        return {}
    arrays = to_numpy(record)
    if runtime.config.compression == "none":
        return arrays
    return Compression(runtime.config.compression).decode(arrays)


def _set_requires_grad(model: Any, names: list[str], flag: bool) -> None:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(flag)


def install_global(runtime: SiteRuntime, received: Arrays) -> Arrays:
    """Load the global tensors into the model (the seeded ones when none came; FFA: the seeded A); returns them."""
    initial = runtime.adapter.initial_state
    if not received:
        arrays = initial
    elif _uses_ffa(runtime):
        arrays = {**{name: initial[name] for name in ffa_frozen_names(initial)}, **received}
    else:
        arrays = received
    _set_requires_grad(
        runtime.adapter.model, list(initial), True
    )  # every travelling tensor is trainable between messages
    set_trainable_arrays(runtime.adapter.model, arrays)
    return arrays


@contextmanager
def strategy_freezing(runtime: SiteRuntime) -> Iterator[list[str]]:
    """While training: FFA freezes every lora_A (yields the frozen names); restored on exit, even on error."""
    frozen = ffa_frozen_names(runtime.adapter.initial_state) if _uses_ffa(runtime) else []
    _set_requires_grad(runtime.adapter.model, frozen, False)
    try:
        yield frozen
    finally:
        _set_requires_grad(runtime.adapter.model, frozen, True)


def reply_names(runtime: SiteRuntime, received: Arrays) -> list[str]:
    """The tensors this site sends back: FFA, after round 1: B and the head; otherwise all of them."""
    names = list(runtime.adapter.initial_state)
    return ffa_trainable_names(names) if _uses_ffa(runtime) and received else sorted(names)


def reply_arrays(runtime: SiteRuntime, received: Arrays) -> Arrays:
    """The trained tensors to send, encoded by the run's codec against ``received``."""
    params = dict(runtime.adapter.model.named_parameters())
    names = reply_names(runtime, received)
    trained = {name: params[name].detach().cpu().numpy().astype(np.float32, copy=True) for name in names}
    start = {**runtime.adapter.initial_state, **received}
    trained = inject_fault(trained, start, runtime.config, runtime.data.index)  # no-op unless attack is set
    if runtime.config.compression == "none":
        return trained
    reference = {name: received[name] for name in names} if received else None
    return Compression(runtime.config.compression).encode(trained, reference=reference)
