"""What one worker process keeps between the messages it serves: one explicit cache with a size it reports.

A simulation worker (a Ray actor) serves many virtual sites in turn; a
deployment SuperNode serves one. Rebuilding the base model, a site's
tokenised records or its embedded features for every message would cost
seconds each, so the process keeps them here, and nowhere else:

- ``model``: the LoRA-wrapped base model per model settings and device
  (``fedcl/model_factory.py``), pinned: loaded once per worker and shared by
  every site it serves (each message overwrites the trainable tensors);
- ``site-data``: a site's tokenised records (``client/site_runtime.py``);
- ``stream-context``: a run's experience plan and schedule (``client/continual.py``);
- ``head-inputs``, ``frozen-features``: a site's embedded records
  (``client/phases.py``);
- ``feature-store``: where a site's features live on its disk (``client/feature_store.py``).

Everything but the model is dropped least recently used first once the
cache passes its budget (run config ``worker-cache-mb``), and rebuilt by the
next message that needs it (features from the site's on-disk store when it
has one). :meth:`WorkerCache.report` says what is held, per kind, in bytes.
Why not ``functools.lru_cache``: entries differ in size by orders of
magnitude (a model vs a plan), so the budget is in bytes, not in entries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

T = TypeVar("T")
DEFAULT_BUDGET_MB = 4096  # what a worker may keep besides its pinned models; 1,000 small sites need ~100 MB


@dataclass
class Entry:
    """One cached value, its estimated size and whether it may be dropped."""

    value: Any
    nbytes: int
    pinned: bool


class WorkerCache:
    """A process's cache of models, site data and features, bounded in bytes (see the module docstring)."""

    def __init__(self, budget_mb: float = DEFAULT_BUDGET_MB) -> None:
        self.entries: OrderedDict[tuple[str, Hashable], Entry] = OrderedDict()
        self.budget_bytes = int(budget_mb * 2**20)
        self.evicted = 0

    def set_budget(self, budget_mb: float) -> None:
        """Bound what the cache keeps besides pinned entries to ``budget_mb`` MiB (ValueError below 0)."""
        if budget_mb < 0:
            raise ValueError(f"worker-cache-mb = {budget_mb!r}: use 0 (keep nothing between messages) or more MiB")
        self.budget_bytes = int(budget_mb * 2**20)
        self.shrink()

    def get(self, kind: str, key: Hashable) -> Any | None:
        """The value cached under ``(kind, key)`` (now the most recently used), or None."""
        entry = self.entries.get((kind, key))
        if entry is None:
            return None
        self.entries.move_to_end((kind, key))
        return entry.value

    def put(self, kind: str, key: Hashable, value: T, pinned: bool = False) -> T:
        """Keep ``value`` under ``(kind, key)`` (replacing what was there), then shrink to the budget; returns it."""
        self.entries.pop((kind, key), None)
        self.entries[(kind, key)] = Entry(value, estimate_bytes(value), pinned)
        self.shrink(keep=(kind, key))
        return value

    def get_or_build(self, kind: str, key: Hashable, build: Callable[[], T], pinned: bool = False) -> T:
        """The cached value, or ``build()`` kept under ``(kind, key)``."""
        found = self.get(kind, key)
        return found if found is not None else self.put(kind, key, build(), pinned)

    def pop(self, kind: str, key: Hashable) -> None:
        """Drop one entry if present."""
        self.entries.pop((kind, key), None)

    def clear(self, kind: str | None = None) -> None:
        """Drop every entry (of ``kind``): what a restarted process would not have."""
        for name in [name for name in self.entries if kind is None or name[0] == kind]:
            del self.entries[name]

    @property
    def nbytes(self) -> int:
        """Estimated bytes of everything held."""
        return sum(entry.nbytes for entry in self.entries.values())

    def unpinned_bytes(self) -> int:
        """Estimated bytes of what may be dropped (what the budget bounds)."""
        return sum(entry.nbytes for entry in self.entries.values() if not entry.pinned)

    def shrink(self, keep: tuple[str, Hashable] | None = None) -> None:
        """Drop the least recently used unpinned entries (never ``keep``) until within the budget."""
        excess = self.unpinned_bytes() - self.budget_bytes
        for name in list(self.entries):
            if excess <= 0:
                break
            entry = self.entries[name]
            if entry.pinned or name == keep:
                continue
            del self.entries[name]
            excess -= entry.nbytes
            self.evicted += 1

    def report(self) -> dict[str, dict[str, int]]:
        """Per kind: entries and estimated bytes; plus ``total`` (with the budget and how many were dropped)."""
        kinds: dict[str, dict[str, int]] = {}
        for (kind, _), entry in self.entries.items():
            row = kinds.setdefault(kind, {"entries": 0, "bytes": 0})
            row["entries"] += 1
            row["bytes"] += entry.nbytes
        kinds["total"] = {
            "entries": len(self.entries),
            "bytes": self.nbytes,
            "budget_bytes": self.budget_bytes,
            "evicted": self.evicted,
        }
        return kinds


class Owners:
    """Objects an entry belongs to, compared by identity and not counted in its size (each is cached on its own).

    A site's features are valid only for the very records and model objects
    they were computed from: ``Owners(data, adapter).same(data, adapter)``
    (identity, not ``id()``, which Python reuses after a free).
    """

    def __init__(self, *objects: Any) -> None:
        self.objects = objects

    def same(self, *objects: Any) -> bool:
        """True if ``objects`` are these very objects, in order."""
        return len(objects) == len(self.objects) and all(a is b for a, b in zip(objects, self.objects))


def estimate_bytes(value: Any, depth: int = 4) -> int:
    """Bytes held by numpy arrays and torch tensors (and modules' parameters) inside ``value``, walked ``depth`` deep.

    An estimate: Python objects' own overhead is left out; arrays reached twice count twice.
    """
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int) and not isinstance(value, (bytes, bytearray)):
        return nbytes  # numpy arrays
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.element_size() * value.numel())  # torch tensors
    if hasattr(value, "parameters") and hasattr(value, "buffers"):  # torch modules
        return sum(estimate_bytes(t, 0) for t in (*value.parameters(), *value.buffers()))
    if depth <= 0:
        return 0
    if isinstance(value, dict):
        return sum(estimate_bytes(v, depth - 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(estimate_bytes(v, depth - 1) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return sum(estimate_bytes(getattr(value, f.name), depth - 1) for f in fields(value))
    return 0


WORKER_CACHE = WorkerCache()  # the one cache of this process
