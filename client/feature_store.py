"""A site's disk cache of the features its model computes from its own records, kept in its state directory.

In a deployment Flower starts a new ClientApp process for every message, so
the per-process caches of ``client/phases.py`` start empty at every message
and each message would embed the site's records again. The store keeps, in
``<state-dir>/feature_cache/``, the last features computed for each split and
kind, one file each (``<kind>-<split>.npz``):

- ``head-inputs``: the tensor entering the head under the current LoRA factors
  (probe rounds, and every evaluation of a given global adapter);
- ``frozen``: the frozen base's unit-length mean-pooled features (nearest class mean).

Each file holds a key: a SHA-256 over everything the features depend on: the
site's data files and how they are read (:func:`client.site_data.files_digest`),
the split's tokenised records, the model (its resolved folder and each file's
name, size and modification time), pooling, max-length, the LoRA settings,
the adapter's fingerprint (head inputs only), the device type, the parameters'
dtype and the torch, transformers and peft versions. A file whose key differs,
that cannot be read, or whose checksum or shape is off is recomputed and
replaced: it is never trusted. A model given as a hub id (no local folder
whose files identify its weights) is never cached. Files are written
atomically (``fedcl/atomic_files.py``); a failed write only costs the next
message the embedding.

Privacy: the features are derived from the site's records. They are computed
on the site and kept in its state directory, which its operator owns and
backs up with the ledger; nothing here sends them anywhere and no reply
carries them (replies are built from the allow-lists of ``fedcl/protocol.py``).

Switch: node config ``feature-cache`` (default true; ``false`` turns the store
off for that site), or, for virtual sites of a simulation (which have no node
config of their own), the environment variable ``FEDCL_FEATURE_CACHE=0``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.common.logger import log

from client.device import module_device
from client.site_data import files_digest, site_files
from client.site_state import SiteState
from fedcl.atomic_files import save_arrays_atomic
from fedcl.model_factory import lora_settings, resolve_model_path
from fedcl.run_config import ConfigError
from fedcl.worker_cache import WORKER_CACHE, Owners

if TYPE_CHECKING:
    from client.site_runtime import SiteRuntime

FEATURE_CACHE_KEY = "feature-cache"  # node config key
FEATURE_CACHE_ENV = "FEDCL_FEATURE_CACHE"  # for virtual sites, which have no node config of their own
FOLDER = "feature_cache"  # inside the site's state directory
FORMAT = "fedcl-feature-cache-1"
HEAD_INPUTS, FROZEN = "head-inputs", "frozen"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class FeatureStore:
    """One site's feature cache: its folder, the digest of the site's files, the model's identity."""

    folder: Path
    records: str  # files_digest of the site's data files and how they are read
    model: dict[str, Any]  # model_identity of the model folder

    def path(self, kind: str, split: str) -> Path:
        """The file holding the latest features of ``kind`` for ``split``."""
        return self.folder / f"{kind}-{split}.npz"

    def load(self, kind: str, split: str, key: str, rows: int) -> np.ndarray | None:
        """The stored features if the file exists, reads cleanly, holds ``key``, ``rows`` rows and its checksum."""
        path = self.path(kind, split)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                stored_key, checksum, features = str(saved["key"]), str(saved["sha256"]), saved["features"]
        except Exception as err:  # any damage (truncation, a bad zip, a missing array): recompute, never trust
            log(WARNING, "feature cache %s is unreadable (%s); recomputing it", path, type(err).__name__)
            return None
        if stored_key != key:
            return None  # other records, model or settings: recompute (and replace)
        if features.ndim < 1 or len(features) != rows or _checksum(features) != checksum:
            log(WARNING, "feature cache %s is damaged (shape or checksum); recomputing it", path)
            return None
        return features

    def save(self, kind: str, split: str, key: str, features: np.ndarray) -> None:
        """Write the features with their key and checksum atomically; a failed write is logged, not raised."""
        path = self.path(kind, split)
        arrays = {"features": features, "key": np.array(key), "sha256": np.array(_checksum(features))}
        try:
            save_arrays_atomic(path, arrays)
        except OSError as err:
            log(WARNING, "feature cache %s not written (%s); the next message embeds again", path, err)


def feature_cache_enabled(node_config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> bool:
    """Node config ``feature-cache`` (true/false), else ``FEDCL_FEATURE_CACHE`` (1/0), else true.

    Raises :class:`ConfigError` for another value, naming where it came from.
    """
    value: Any = node_config.get(FEATURE_CACHE_KEY)
    where = f"node config '{FEATURE_CACHE_KEY}'"
    if value is None:
        value = (os.environ if environ is None else environ).get(FEATURE_CACHE_ENV)
        where = f"environment variable {FEATURE_CACHE_ENV}"
        if value is None:
            return True
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{where} = {value!r}: use true or false (false keeps no features on disk)")


def model_identity(spec: str) -> dict[str, Any] | None:
    """The model folder's path and each file's name, size and modification time; None for a hub id (no folder)."""
    folder = Path(resolve_model_path(spec))
    if not folder.is_dir():
        return None
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            stat = path.stat()
            files.append([str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    return {"path": str(folder.resolve()), "files": files}


def attach_feature_store(
    runtime: SiteRuntime,
    node_config: Mapping[str, Any],
    state: SiteState,
    environ: Mapping[str, str] | None = None,
) -> FeatureStore | None:
    """Give this site's records a feature store in its state directory (None: switched off, or a hub model).

    Called once per message, after the runtime is built; the store is used
    only for this very ``runtime.data`` object (identity), so another site
    served by the same process, or the same site with other records, never
    meets it. Raises :class:`ConfigError` for a bad ``feature-cache`` value.
    """
    name = runtime.data.name
    WORKER_CACHE.pop("feature-store", name)
    if not feature_cache_enabled(node_config, environ):
        return None
    model = model_identity(runtime.config.model)
    if model is None:
        return None
    files = site_files(node_config, runtime.config, environ)
    store = FeatureStore(state.folder / FOLDER, files_digest(files), model)
    WORKER_CACHE.put("feature-store", name, (Owners(runtime.data), store))
    return store


def store_of(runtime: SiteRuntime) -> FeatureStore | None:
    """The store attached to this runtime's records, if any."""
    entry = WORKER_CACHE.get("feature-store", runtime.data.name)
    return entry[1] if entry is not None and entry[0].same(runtime.data) else None


def features_key(runtime: SiteRuntime, store: FeatureStore, kind: str, split: str, adapter: str) -> str:
    """SHA-256 of everything the features of ``kind`` for ``split`` depend on (see the module docstring)."""
    import peft
    import transformers

    data = runtime.data.train if split == "train" else runtime.data.test
    tokens = hashlib.sha256()
    for name in sorted(data.inputs):
        tokens.update(name.encode())
        tokens.update(data.inputs[name].detach().cpu().contiguous().numpy().tobytes())
    config, model = runtime.config, runtime.adapter.model
    facts = {
        "format": FORMAT,
        "kind": kind,
        "split": split,
        "records": store.records,
        "tokens": tokens.hexdigest(),
        "model": store.model,
        "pooling": config.pooling,
        "max-length": config.max_length,
        "lora": lora_settings(config),
        "adapter": adapter,
        "device": module_device(model).type,
        "dtype": str(next(model.parameters()).dtype),
        "versions": [torch.__version__, transformers.__version__, peft.__version__],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def stored_features(
    runtime: SiteRuntime, kind: str, split: str, adapter: str, compute: Callable[[], np.ndarray]
) -> np.ndarray:
    """The features from the site's store when its key matches, else ``compute()`` (then stored).

    ``adapter`` names what the features depend on beyond the records and the
    model (the LoRA fingerprint for head inputs; a constant for the frozen
    base). Without a store this is ``compute()``.
    """
    store = store_of(runtime)
    if store is None:
        return compute()
    key = features_key(runtime, store, kind, split, adapter)
    cached = store.load(kind, split, key, _rows(runtime, split))
    if cached is not None:
        return cached
    features = compute()
    store.save(kind, split, key, features)
    return features


def stored_head_inputs(
    runtime: SiteRuntime, split: str, fingerprint: str, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """:func:`stored_features` for head inputs: a tensor on the model's device, keyed by the LoRA ``fingerprint``.

    Head inputs of a dtype numpy cannot hold (bfloat16) are computed and not stored.
    """
    store = store_of(runtime)
    if store is None:
        return compute()
    key = features_key(runtime, store, HEAD_INPUTS, split, fingerprint)
    cached = store.load(HEAD_INPUTS, split, key, _rows(runtime, split))
    if cached is not None:
        return torch.from_numpy(cached).to(module_device(runtime.adapter.model))
    features = compute()
    try:
        array = features.detach().cpu().numpy()
    except TypeError:
        return features
    store.save(HEAD_INPUTS, split, key, array)
    return features


def forget_feature_stores() -> None:
    """Detach every store (what a restarted site process would not have)."""
    WORKER_CACHE.clear("feature-store")


def _rows(runtime: SiteRuntime, split: str) -> int:
    return len(runtime.data.train if split == "train" else runtime.data.test)


def _checksum(features: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest()
