"""The worker's one cache: sizes counted by hand, least recently used dropped first, the model pinned."""

import numpy as np
import pytest
import torch

from fedcl.worker_cache import Owners, WorkerCache, estimate_bytes

MB = 2**20


def test_sizes_are_the_arrays_and_tensors_inside():
    array = np.zeros((10, 384), dtype=np.float32)  # 15,360 bytes
    tensor = torch.zeros(3, 128, dtype=torch.int64)  # 3,072 bytes
    module = torch.nn.Linear(4, 2)  # 8 + 2 float32 parameters: 40 bytes
    assert estimate_bytes(array) == 15_360
    assert estimate_bytes({"a": (array, tensor), "b": [module]}) == 15_360 + 3_072 + 40
    assert estimate_bytes((Owners(array), tensor)) == 3_072  # owners are cached on their own: not counted twice


def test_least_recently_used_is_dropped_first_and_pinned_never():
    cache = WorkerCache(budget_mb=2)
    cache.put("model", "m", np.zeros(5 * MB, dtype=np.uint8), pinned=True)  # above the budget, but pinned
    cache.put("site-data", "a", np.zeros(MB, dtype=np.uint8))
    cache.put("site-data", "b", np.zeros(MB, dtype=np.uint8))
    assert cache.get("site-data", "a") is not None  # a is now the most recently used
    cache.put("site-data", "c", np.zeros(MB, dtype=np.uint8))  # 3 MB unpinned > 2 MB: b goes
    assert cache.get("site-data", "b") is None and cache.get("site-data", "a") is not None
    assert cache.get("model", "m") is not None
    report = cache.report()
    assert report["site-data"] == {"entries": 2, "bytes": 2 * MB}
    assert report["model"] == {"entries": 1, "bytes": 5 * MB}
    assert report["total"] == {"entries": 3, "bytes": 7 * MB, "budget_bytes": 2 * MB, "evicted": 1}


def test_a_smaller_budget_shrinks_at_once_and_a_negative_one_is_refused():
    cache = WorkerCache(budget_mb=10)
    for name in "abc":
        cache.put("head-inputs", name, np.zeros(MB, dtype=np.uint8))
    cache.set_budget(1)
    assert [key for (_, key) in cache.entries] == ["c"]
    with pytest.raises(ValueError, match="worker-cache-mb"):
        cache.set_budget(-1)


def test_owners_compare_by_identity():
    data, other = np.zeros(3), np.zeros(3)
    owners = Owners(data, "adapter")
    assert owners.same(data, "adapter") and not owners.same(other, "adapter") and not owners.same(data)


def test_two_sites_in_one_worker_share_one_model_and_keep_their_own_records(tmp_path, tiny_model_dir):
    from site_helpers import forget_process_state, runtime_of

    from fedcl.worker_cache import WORKER_CACHE

    forget_process_state()
    flat = {
        "model": str(tiny_model_dir),
        "num-sites": 2,
        "max-length": 16,
        "max-train-examples": 20,
        "max-test-examples": 8,
    }
    first, second = runtime_of(flat, 0), runtime_of(flat, 1)
    assert first.adapter is second.adapter and first.data is not second.data
    report = WORKER_CACHE.report()
    assert report["model"]["entries"] == 1 and report["site-data"]["entries"] == 2
    records = sum(estimate_bytes(r.data.train) + estimate_bytes(r.data.test) for r in (first, second))
    assert report["site-data"]["bytes"] == records
